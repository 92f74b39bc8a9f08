"""The NAR+AR speech decoder against the official fixture (vita_tts_ckpt/reference)."""

import numpy as np

from conftest import rel_err, tts_ref


def test_teacher_forced_logits_and_loss(speech, tts_dir):
    r = tts_ref(tts_dir, "decoder_train")
    logits, loss = speech.decoder_forward(r["x"], r["x_lens"], r["y"], r["y_lens"])
    assert logits.shape == r["logits"].shape
    v = r["valid"]
    assert rel_err(logits[v], r["logits"][v]) <= 1e-5
    assert abs(loss - float(r["loss"])) / float(r["loss"]) <= 1e-5


def test_decoder_input_from_llm_rows(tts_dir):
    """x is the LLM input-embedding rows of the text, each split row-major into 4 vectors."""
    r = tts_ref(tts_dir, "decoder_train")
    rows = r["llm_embed_table"][r["text_ids"][0]]
    np.testing.assert_array_equal(rows.reshape(-1, rows.shape[1] // 4), r["x"][0, :r["x_lens"][0]])


def test_greedy_codes_and_step_logits(speech, tts_dir):
    g = tts_ref(tts_dir, "decoder_infer_greedy")
    rec = []
    codes = list(speech.iter_codes(g["hidden"], top_k=1, max_tokens=40, record=rec))
    assert codes == g["tokens"].tolist()  # EOS at step 21 not yielded
    logits = np.stack([lg for lg, _ in rec])
    assert rel_err(logits[0], g["step_logits"][0]) <= 1e-5
    assert rel_err(logits, g["step_logits"]) <= 1e-5
    np.testing.assert_array_equal(speech.generate_codes(g["hidden"], top_k=1, max_tokens=40), g["tokens"])


def test_repetition_penalty_codes(speech, tts_dir):
    p = tts_ref(tts_dir, "decoder_infer_penalty")
    out = speech.generate_codes(p["hidden"], top_k=1, max_tokens=40, penalty_window=5, penalty=1.1)
    np.testing.assert_array_equal(out, p["tokens"])


def test_top2_distributions_replayed(speech, tts_dir):
    t = tts_ref(tts_dir, "decoder_infer_topk2")
    rec = []
    out = list(speech.iter_codes(t["hidden"], top_k=2, max_tokens=40, replay=t["sampled"], record=rec))
    assert out == t["tokens"].tolist()
    probs = np.stack([p for _, p in rec])
    assert np.abs(probs - t["probs"]).max() <= 1e-5
    assert ((probs > 0).sum(-1) == 2).all()
    a = speech.generate_codes(t["hidden"], top_k=2, max_tokens=40, seed=5)
    b = speech.generate_codes(t["hidden"], top_k=2, max_tokens=40, seed=5)
    np.testing.assert_array_equal(a, b)


def test_token_limit_and_empty_input(speech, tts_dir):
    g = tts_ref(tts_dir, "decoder_infer_greedy")
    assert len(speech.generate_codes(g["hidden"], top_k=1, max_tokens=7)) == 7  # EOS never reached
    assert speech.generate_codes(np.zeros((0, speech.decoder_cfg.idim), np.float32)).shape == (0,)
