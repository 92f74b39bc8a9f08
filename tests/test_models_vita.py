"""The full model against the official fixture: splicing, logits, loss, greedy decoding."""
import os

import numpy as np
import pytest

from vita_jax.data.batch import plan_splice
from vita_jax.models.vita import AUDIO, IMAGE, PAD, TEXT

from conftest import rel_err


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def fwd(tiny_dir):
    return np.load(os.path.join(tiny_dir, "reference/forward.npz"))


def _inputs(f):
    # the fixture's images hold a dummy zero tile for sample 1 (row 3); real tiles only are passed
    return (f["input_ids"], f["attention_mask"]), dict(pixel_values=f["images"][:3], audio_features=f["audio_feats"],
                                                       audio_lengths=f["audio_lengths"])


def test_splice_plan_matches_official_layout(fwd):
    plan = plan_splice(fwd["input_ids"], fwd["attention_mask"], fwd["labels"], tokens_per_tile=4,
                       audio_llm_lengths=fwd["audio_lengths_for_llm"], audio_len=100, n_tiles=3)
    np.testing.assert_array_equal(plan.lengths, fwd["spliced_lengths"])
    L = plan.kind.shape[1]
    np.testing.assert_array_equal(plan.kind, fwd["spliced_kind"][:, :L])
    np.testing.assert_array_equal(plan.labels, fwd["spliced_labels"][:, :L])
    np.testing.assert_array_equal(plan.attention_mask.astype(bool), fwd["spliced_attention_mask"][:, :L])
    ref_src = fwd["spliced_src_index"][:, :L]
    img = plan.kind == IMAGE
    np.testing.assert_array_equal(plan.src[img], ref_src[img])  # global_tile * 4 + k
    aud = plan.kind == AUDIO
    np.testing.assert_array_equal(plan.src[aud] // 100 * 10000 + plan.src[aud] % 100, ref_src[aud])
    txt = plan.kind == TEXT
    for b in range(2):
        real = fwd["input_ids"][b][fwd["attention_mask"][b]]
        np.testing.assert_array_equal(plan.text_ids[b][txt[b]], real[ref_src[b][txt[b]]])


def test_spliced_embeddings(model, fwd):
    (ids, mask), media = _inputs(fwd)
    plan, args = model._prepare(ids, mask, None, media["pixel_values"], media["audio_features"],
                                media["audio_lengths"])
    emb = np.asarray(model._embed(model.params, *args))
    ref = fwd["spliced_inputs_embeds"]
    for b, n in enumerate(fwd["spliced_lengths"]):
        assert rel_err(emb[b, :n], ref[b, :n]) <= 1e-5
    assert (emb[plan.kind == PAD] == 0).all()


def test_logits_and_loss(model, fwd):
    (ids, mask), media = _inputs(fwd)
    logits = model.forward(ids, mask, **media)
    assert logits.shape == fwd["logits"].shape
    real = fwd["spliced_attention_mask"]
    assert rel_err(logits[real], fwd["logits"][real]) <= 1e-5
    loss = model.loss(ids, mask, fwd["labels"], **media)
    assert abs(loss - float(fwd["loss"])) / float(fwd["loss"]) <= 1e-5


def test_greedy_ids(model, tiny_dir):
    g = np.load(os.path.join(tiny_dir, "reference/generate.npz"))
    out = model.generate(g["input_ids"], pixel_values=g["images"], audio_features=g["audio_feats"],
                         audio_lengths=g["audio_lengths"], max_new_tokens=8, stop_ids=[])
    np.testing.assert_array_equal(out, g["output_ids"])


def test_text_only_with_placeholder_free_ids(model, tiny_dir):
    t = np.load(os.path.join(tiny_dir, "reference/forward_textonly.npz"))
    assert rel_err(model.forward(t["input_ids"]), t["logits_with_dummies"]) <= 1e-5


def test_truncation_after_splicing(model, fwd):
    (ids, mask), media = _inputs(fwd)
    model.config.tokenizer_model_max_length = 40
    try:
        logits = model.forward(ids, mask, **media)
    finally:
        model.config.tokenizer_model_max_length = 6200
    assert logits.shape[1] == 40
    # causal model: the first 40 positions are unchanged by the cut
    assert rel_err(logits[0], fwd["logits"][0, :40]) <= 1e-5


def test_media_count_errors(model, fwd):
    (ids, mask), media = _inputs(fwd)
    with pytest.raises(ValueError, match="image tiles given but the ids hold 3"):
        model.forward(ids, mask, pixel_values=fwd["images"], audio_features=media["audio_features"],
                      audio_lengths=media["audio_lengths"])
    with pytest.raises(ValueError, match="more <audio> placeholders than the 1 clips"):
        model.forward(ids, mask, pixel_values=media["pixel_values"], audio_features=fwd["audio_feats"][:1],
                      audio_lengths=fwd["audio_lengths"][:1])
    with pytest.raises(ValueError, match="unknown placeholder id -7"):
        model.forward(np.array([[1, -7, 2]]))
