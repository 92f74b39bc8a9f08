"""The full model against the official code on a second fixture of other dimensions (issue #24): a tiny VITA-1.5
with a 3-layer Qwen2 of 5 heads / 1 KV head and vocabulary 224, an InternViT of 42 px tiles with 7 px patches
(9 tokens per tile), a 3-block whale with a kernel-3 ReLU adapter, bf16 shards, and a batch of 4 rows (two images
in one row, two clips in another, a text-only row, ignored spans inside answers). ``tests/data/vita_variant``:
the checkpoint in the official release layout, the official outputs (``reference.npz``) and their generator
(``make.py``, which runs the official code); tolerances are the shared fixture README's."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vita_jax
from vita_jax.data import packing
from vita_jax.models.vita import IGNORE_INDEX, PAD, lm_loss_terms

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "vita_variant")


@pytest.fixture(scope="module")
def model():
    return vita_jax.from_pretrained(os.path.join(DATA, "ckpt"))


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(DATA, "reference.npz")))


def _media(r):
    # real tiles and clips only (the official call also had zero dummies for the rows without media)
    return dict(pixel_values=r["pixel_values"], audio_features=r["audio_feats"], audio_lengths=r["audio_lengths"])


def test_release_dimensions_read(model):
    c = model.config
    assert (c.llm.num_attention_heads, c.llm.num_key_value_heads, c.llm.num_hidden_layers) == (5, 1, 3)
    assert (c.vision.image_size, c.vision.patch_size, model.tokens_per_tile) == (42, 7, 9)
    assert (c.audio.num_blocks, c.audio.kernel_size, c.audio.activation) == (3, 3, "relu")


def test_spliced_embeddings(model, ref):
    plan, args = model._prepare(ref["input_ids"], ref["attention_mask"], None, **_media(ref))
    np.testing.assert_array_equal(plan.lengths, ref["spliced_lengths"])
    emb = np.asarray(model._embed(model.params, *args))
    for b, n in enumerate(ref["spliced_lengths"]):
        assert np.abs(emb[b, :n] - ref["spliced_inputs_embeds"][b, :n]).max() <= 5e-5
    assert (emb[plan.kind == PAD] == 0).all()


def test_logits_and_loss(model, ref):
    logits = model.forward(ref["input_ids"], ref["attention_mask"], **_media(ref))
    assert logits.shape == ref["logits"].shape
    real = ref["spliced_attention_mask"]
    assert np.abs(logits[real] - ref["logits"][real]).max() <= 1e-4
    loss = model.loss(ref["input_ids"], ref["attention_mask"], ref["labels"], **_media(ref))
    assert abs(loss - float(ref["loss"])) <= 1e-5


def _examples(r):
    """The batch's rows as packing examples (their own tiles and unpadded clips)."""
    tiles = np.cumsum([0] + [int((row == -200).sum()) for row in r["input_ids"]])
    clips = np.cumsum([0] + [int((row == -500).sum()) for row in r["input_ids"]])
    out = []
    for b, (ids, mask) in enumerate(zip(r["input_ids"], r["attention_mask"])):
        ex = {"id": f"row{b}", "input_ids": ids[mask], "labels": r["labels"][b][mask]}
        if tiles[b + 1] > tiles[b]:
            ex["pixels"] = r["pixel_values"][tiles[b]:tiles[b + 1]]
        if clips[b + 1] > clips[b]:
            ex["audio"] = [r["audio_feats"][k, :r["audio_lengths"][k]] for k in range(clips[b], clips[b + 1])]
        out.append(ex)
    return out


def test_packed_loss_equals_official_per_example(model, ref):
    """The 4 rows packed 2 by 2 (vita_jax's packing): the batch loss equals the official batch loss, and each
    example's mean CE / target count equals the official loss of that example computed alone."""
    examples = _examples(ref)
    budget = packing.Budget(rows=2, seq_len=128, tile_slots=8, clip_slots=3, frame_slots=112,
                            tokens_per_tile=model.tokens_per_tile, image_size=model.vit_cfg.image_size)
    rows, left = packing.place(examples, budget, np.argsort([-budget.length(e) for e in examples], kind="stable"))
    assert left == [] and [len(r) for r in rows] == [2, 2]
    b = jax.tree.map(jnp.asarray, packing.pack(examples, rows, budget))
    logits = jax.jit(model.module.apply)({"params": model.params}, b["kind"], b["text_ids"], b["src"], b["pixels"],
                                         b["audio_feats"], b["audio_lens"], b["segment_ids"], b["positions"])
    total, count = lm_loss_terms(logits, b["labels"])
    assert int(count) == int(ref["example_count"].sum())
    assert abs(float(total) / int(count) - float(ref["loss"])) <= 1e-5
    # per example: CE of position t against labels[t + 1], attributed to the segment of t + 1
    lg = np.asarray(logits, np.float64)[:, :-1]
    tgt, seg = np.asarray(b["labels"])[:, 1:], np.asarray(b["segment_ids"])[:, 1:]
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    ce = lse - np.take_along_axis(lg, np.maximum(tgt, 0)[..., None], -1)[..., 0]
    for r, row in enumerate(rows):
        for s, i in enumerate(row, start=1):
            on = (seg[r] == s) & (tgt[r] != IGNORE_INDEX)
            assert on.sum() == ref["example_count"][i]
            assert abs(ce[r][on].mean() - float(ref["example_loss"][i])) <= 1e-5, (i, ce[r][on].mean())
