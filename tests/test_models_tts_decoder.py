"""The NAR+AR speech decoder against the official fixture (vita_tts_ckpt/reference)."""

import os

import numpy as np
import pytest

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


# ---------------------------------------------------------------- a second fixture (tests/data/tts_variant)
# Other dimensions and weights (idim 24, odim 40, 3 heads, 2 blocks), made with the official code by
# tests/data/tts_variant/make.py; in the penalty and top-3 modes the official loop draws a special id
# other than EOS (BOS = odim, SOS = odim + 1) and goes on: the decoder must return it too.
VARIANT = os.path.join(os.path.dirname(__file__), "data", "tts_variant")
MODES = ("greedy", "penalty", "topk2", "topk3_penalty")


@pytest.fixture(scope="module")
def variant():
    from vita_jax.convert.tts import load_decoder
    from vita_jax.infer.speech import SpeechModel
    cfg, params = load_decoder(os.path.join(VARIANT, "decoder"))
    return SpeechModel(cfg, params), np.load(os.path.join(VARIANT, "reference.npz"))


def _settings(ref, mode):
    k, window, penalty, _ = ref[f"{mode}.settings"]
    return dict(top_k=int(k), penalty_window=int(window), penalty=float(penalty))


@pytest.mark.parametrize("mode", MODES)
def test_variant_every_mode_replayed(variant, mode):
    """Replaying the official draws gives the official ids (special ids included) and, at every step,
    the distribution the official code handed to ``torch.multinomial``."""
    speech, ref = variant
    rec = []
    out = list(speech.iter_codes(ref["hidden"], max_tokens=40, replay=ref[f"{mode}.drawn"], record=rec,
                                 **_settings(ref, mode)))
    assert out == ref[f"{mode}.tokens"].tolist()
    probs = np.stack([p for _, p in rec])
    assert probs.shape == ref[f"{mode}.probs"].shape
    assert np.abs(probs - ref[f"{mode}.probs"]).max() <= 1e-5


def test_variant_special_ids_are_returned(variant):
    """Greedy decoding returns exactly the official ids; with the penalty that includes BOS (odim) at
    step 14, after which the official loop went on to EOS at step 38."""
    speech, ref = variant
    odim = speech.decoder_cfg.odim
    for mode in ("greedy", "penalty"):
        out = speech.generate_codes(ref["hidden"], max_tokens=40, **_settings(ref, mode))
        np.testing.assert_array_equal(out, ref[f"{mode}.tokens"])
    assert (ref["penalty.tokens"] == odim).any() and (ref["topk3_penalty.tokens"] == odim + 1).any()
    assert ref["penalty.drawn"][-1] == odim + 2 and len(ref["penalty.tokens"]) > 30


def test_variant_greedy_not_on_a_tie(variant):
    """The fixture's greedy choices are not near-ties (so float32 rounding cannot decide them):
    the winning penalised logit leads the next by more than 1e-3 at every step."""
    speech, ref = variant
    for mode in ("greedy", "penalty"):
        s = _settings(ref, mode)
        history, gaps = [speech.decoder_cfg.sos], []
        rec = []
        list(speech.iter_codes(ref["hidden"], max_tokens=40, record=rec, **s))
        for (logits, _), tok in zip(rec, ref[f"{mode}.drawn"]):
            lg = np.array(logits, np.float64)
            for t in history[-s["penalty_window"]:] if s["penalty_window"] > 0 else []:
                lg[t] /= s["penalty"]
            top = np.sort(lg)[-2:]
            gaps.append(top[1] - top[0])
            history.append(int(tok))
        assert min(gaps) > 1e-3, (mode, min(gaps))
