"""Packing: the loss (and gradient) of a packed batch equals the official loss of the same examples
computed one by one; the packed stream drops and duplicates nothing and resumes bitwise."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vita_jax.data import packing
from vita_jax.data.batch import LMCollator
from vita_jax.models.vita import AUDIO_TOKEN_INDEX, IMAGE_TOKEN_INDEX, PAD, lm_loss_terms

from conftest import make_example


@pytest.fixture(scope="module")
def examples(tiny_model):
    rng = np.random.default_rng(0)
    v, s = tiny_model.llm_cfg.vocab_size, tiny_model.vit_cfg.image_size
    return [make_example(rng, 0, v, s, tiles=3),                    # an image of 3 tiles
            make_example(rng, 1, v, s, tiles=4, text=12),           # a video: 4 frames, one tile each
            make_example(rng, 2, v, s, clips=(150,)),               # a spoken question
            make_example(rng, 3, v, s, text=30),                    # text only
            make_example(rng, 4, v, s, tiles=1, clips=(90,), text=8)]  # an image and speech


@pytest.mark.slow  # a minute or more on 2 cores: outside the quick loop
def test_packed_loss_and_gradient_equal_one_by_one(tiny_model, examples):
    m = tiny_model
    budget = packing.Budget(rows=2, seq_len=256, tile_slots=8, clip_slots=2, frame_slots=192,
                            tokens_per_tile=m.tokens_per_tile, image_size=m.vit_cfg.image_size)
    rows, left = packing.place(examples, budget, range(len(examples)))
    assert left == [] and sum(len(r) for r in rows) == 5 and max(len(r) for r in rows) >= 2  # really packed
    b = jax.tree.map(jnp.asarray, packing.pack(examples, rows, budget))
    assert int(b["segment_ids"].max()) >= 2 and b["kind"].shape == (2, 256)

    def packed(p):
        logits = m.module.apply({"params": p}, b["kind"], b["text_ids"], b["src"], b["pixels"], b["audio_feats"],
                                b["audio_lens"], b["segment_ids"], b["positions"])
        total, count = lm_loss_terms(logits, b["labels"])
        return total, count

    # the official layout (the training collator, unpacked): one example per row, rows do not interact
    col = LMCollator(m.tokens_per_tile, seq_len=256, max_tiles=8, max_clips=2, max_frames=192,
                     image_size=m.vit_cfg.image_size)
    u = jax.tree.map(jnp.asarray, col(examples))
    assert not col.skipped

    def unpacked(p):
        logits = m.module.apply({"params": p}, u["kind"], u["text_ids"], u["src"], u["pixels"], u["audio_feats"],
                                u["audio_lens"])
        total, count = lm_loss_terms(logits, u["labels"])
        return total, count

    (tp, cp), gp = jax.jit(jax.value_and_grad(packed, has_aux=True))(m.params)
    (to, co), go = jax.jit(jax.value_and_grad(unpacked, has_aux=True))(m.params)
    assert int(cp) == int(co) > 0
    assert abs(float(tp) / int(cp) - float(to) / int(co)) <= 1e-6 * float(to) / int(co)
    # gradients of the summed CE, relative to each leaf's scale
    worst = max(float(jnp.abs(a - c).max() / jnp.maximum(jnp.abs(c).max(), 1e-3))
                for a, c in zip(jax.tree.leaves(gp), jax.tree.leaves(go)))
    assert worst <= 1e-4, worst


class _Stream:
    """Random access: sample ``i`` is an example of a length drawn from ``i`` (some with tiles)."""

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        n = int(rng.integers(5, 90))
        tiles = int(rng.integers(0, 3)) if i % 3 == 0 else 0
        ids = np.concatenate([[IMAGE_TOKEN_INDEX] * tiles, rng.integers(10, 100, n)]).astype(np.int64)
        ex = {"id": f"s{i}", "input_ids": ids, "labels": ids.copy()}
        if tiles:
            ex["pixels"] = np.full((tiles, 3, 8, 8), i, np.float32)
        if i % 17 == 5:
            ex = {"id": f"s{i}", "bad": "unreadable"}
        return ex


def test_stream_drops_nothing_and_resumes_bitwise():
    budget = packing.Budget(rows=3, seq_len=128, tile_slots=4, clip_slots=0, frame_slots=0, tokens_per_tile=4,
                            image_size=8)
    it = packing.PackedBatches(_Stream(), None, budget)
    batches = [next(it) for _ in range(12)]
    assert all(b["kind"].shape == (3, 128) and b["pixels"].shape == (4, 3, 8, 8) for b in batches)
    placed = it.stats["examples"]
    real = sum(int((b["kind"] != PAD).sum()) for b in batches)
    assert real / (12 * 3 * 128) > 0.85  # the rows are full
    # every sample read was placed exactly once, waits, or was skipped as bad
    n_read = it.next
    bad = {f"s{i}" for i in range(n_read) if i % 17 == 5}
    assert set(it.skipped) == bad
    assert placed + len(it.pending) + len(bad) == n_read
    # resume: a fresh iterator restored from the state after step 6 continues exactly
    it2 = packing.PackedBatches(_Stream(), None, budget)
    for _ in range(6):
        next(it2)
    state = it2.get_state()
    it3 = packing.PackedBatches(_Stream(), None, budget)
    it3.set_state(state)
    for b in batches[6:]:
        c = next(it3)
        assert all(np.array_equal(b[k], c[k]) for k in b)


def test_pack_layout():
    ex = [{"input_ids": np.arange(10, 15), "labels": np.arange(10, 15)},
          {"input_ids": np.arange(20, 23), "labels": np.arange(20, 23)}]
    budget = packing.Budget(rows=1, seq_len=10, tile_slots=0, clip_slots=0, frame_slots=0, tokens_per_tile=4,
                            image_size=8)
    b = packing.pack(ex, [[0, 1]], budget)
    assert b["segment_ids"][0].tolist() == [1] * 5 + [2] * 3 + [0] * 2
    assert b["positions"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 0]
    assert b["labels"][0].tolist() == [-100, 11, 12, 13, 14, -100, 21, 22, -100, -100]
    assert b["text_ids"][0, :8].tolist() == [10, 11, 12, 13, 14, 20, 21, 22]


def test_clip_groups_loss_equals_one_by_one(tiny_model, examples):
    """Clips in slots of two lengths (the shortest that holds each) give the loss of the examples
    computed one by one, each clip padded to the full frame budget."""
    m = tiny_model
    budget = packing.Budget(rows=2, seq_len=256, tile_slots=8, clip_slots=0, frame_slots=0,
                            tokens_per_tile=m.tokens_per_tile, image_size=m.vit_cfg.image_size,
                            audio_groups=[[192, 1], [96, 1]])
    rows, left = packing.place(examples, budget, range(len(examples)))
    assert left == []
    b = packing.pack(examples, rows, budget)
    assert [np.shape(f) for f in b["audio_feats"]] == [(1, 96, 80), (1, 192, 80)]
    assert [n.tolist() for n in b["audio_lens"]] == [[90], [150]]  # each clip in the shortest slot holding it
    b = jax.tree.map(jnp.asarray, b)
    col = LMCollator(m.tokens_per_tile, seq_len=256, max_tiles=8, max_clips=2, max_frames=192,
                     image_size=m.vit_cfg.image_size)
    u = jax.tree.map(jnp.asarray, col(examples))

    @jax.jit
    def losses(p):
        lp = m.module.apply({"params": p}, b["kind"], b["text_ids"], b["src"], b["pixels"], b["audio_feats"],
                            b["audio_lens"], b["segment_ids"], b["positions"])
        lu = m.module.apply({"params": p}, u["kind"], u["text_ids"], u["src"], u["pixels"], u["audio_feats"],
                            u["audio_lens"])
        return lm_loss_terms(lp, b["labels"]), lm_loss_terms(lu, u["labels"])
    (tp, cp), (to, co) = losses(m.params)
    assert int(cp) == int(co) > 0
    assert abs(float(tp) / int(cp) - float(to) / int(co)) <= 1e-6 * float(to) / int(co)


class _MediaStream:
    """Sample ``i``: a text, an image of 2-7 tiles, or a spoken question of 40-300 frames."""

    def __getitem__(self, i):
        rng = np.random.default_rng(1000 + i)
        kind = i % 3
        tiles = int(rng.integers(2, 8)) if kind == 1 else 0
        frames = int(rng.integers(40, 300)) if kind == 2 else 0
        n = int(rng.integers(10, 60))
        ids = np.concatenate([[IMAGE_TOKEN_INDEX] * tiles + [AUDIO_TOKEN_INDEX] * (frames > 0),
                              rng.integers(10, 100, n)]).astype(np.int64)
        ex = {"id": f"m{i}", "input_ids": ids, "labels": ids.copy()}
        if tiles:
            ex["pixels"] = np.full((tiles, 3, 16, 16), i % 7, np.float32)
        if frames:
            ex["audio"] = np.full((frames, 80), i % 5, np.float32)
        return ex


def test_budgets_sized_from_the_data_fill_the_towers():
    """data.budgets='auto': tile slots and clip groups from the first samples; the towers then compute
    mostly real tiles and frames, and the stream still drops nothing and resumes exactly."""
    from vita_jax.data import pipeline
    from vita_jax.train import stages
    c = stages.stage_config("2.2", "tiny")
    c.data.update(seq_len=512, calibration_examples=120, max_frames=320, max_tiles_per_sample=8)
    c.vision.update(image_size=16, patch_size=4)  # 4 LLM positions a tile
    lay = dict(local=3, index=0, count=1, accum=1)
    tiles, groups, report = pipeline.calibrate(c, _MediaStream(), None, lay, workers=2)
    assert 1 <= len(groups) <= pipeline.MAX_GROUPS and all(f <= 320 for f, _ in groups)
    budget = pipeline.packing_budget(c, lay, tiles, groups)
    assert budget.tile_slots == tiles and [[g.frames, g.slots] for g in budget.groups] == sorted(groups)
    it = packing.PackedBatches(_MediaStream(), None, budget, workers=2)
    from vita_jax.bench import batch_usage
    tot = {}
    for step in range(30):
        if step == 20:
            state = it.get_state()
        b = next(it)
        if step == 20:  # a fresh iterator restored from the state (read-ahead threads and all) continues exactly
            again = packing.PackedBatches(_MediaStream(), None, budget, workers=2)
            again.set_state(state)
            c2 = next(again)
            assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(b), jax.tree.leaves(c2)))
        for k, v in batch_usage(b, budget.tpt).items():
            tot[k] = tot.get(k, 0) + v
    assert tot["llm_real"] / tot["llm_slots"] > 0.85, tot
    assert tot["tiles_real"] / tot["tile_slots"] > 0.85, tot
    assert tot["frames_real"] / tot["frame_slots"] > 0.7, tot
    assert not it.skipped and it.stats["examples"] + len(it.pending) == it.next
