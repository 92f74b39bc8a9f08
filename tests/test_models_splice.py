"""The splice local to each chip (vita_jax/models/splice.py, data/shards.py): the collator and the packer lay
each batch shard's media in its own slots, the shard-local gather gives the global gather's values, and on a
mesh it moves no media between devices (8 fake CPU devices in a subprocess)."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from vita_jax.data import packing, shards
from vita_jax.data.batch import LMCollator
from vita_jax.data.pipeline import stack_micro_batches
from vita_jax.models import splice

from conftest import HANG_S, REPO, XLA_BASE, make_example


def _examples(m, n=8, seed=0):
    rng = np.random.default_rng(seed)
    v, s = m.llm_cfg.vocab_size, m.vit_cfg.image_size
    kinds = [dict(tiles=2), dict(clips=(150,)), dict(text=30), dict(tiles=1, clips=(90,), text=8)]
    return [make_example(rng, i, v, s, **kinds[(i * 3 + seed) % 4]) for i in range(n)]


def _embeds(m, b):
    return np.asarray(m.module.apply({"params": m.params}, b["kind"], b["text_ids"], b["src"], b["pixels"],
                                     b["audio_feats"], b["audio_lens"], method="embed"))


def test_local_src_maps_each_shards_rows_to_its_own_block():
    # 2 arrays (e.g. clip groups) of 4 slots each over 2 shards: (slots, rows per slot) = (4, 3) and (4, 5)
    layout, n = [(4, 3), (4, 5)], 2
    src = np.array([[6, 7, 8, 12 + 10, 12 + 11],    # shard 1: group 0 slot 2, group 1 slot 2
                    [0, 1, 3, 12 + 0, 12 + 5]])     # shard 0: group 0 slots 0-1, group 1 slot 1
    kind = np.full(src.shape, splice.AUDIO)
    got = np.stack([np.asarray(splice.local_src(jnp.asarray(src[r]), jnp.asarray(kind[r]), s, n, layout,
                                                splice.AUDIO)) for r, s in ((0, 1), (1, 0))])
    # locally: group 0's 2 slots (6 rows), then group 1's 2 slots (10 rows)
    np.testing.assert_array_equal(got, [[0, 1, 2, 6 + 0, 6 + 1], [0, 1, 3, 6 + 0, 6 + 5]])


def test_collator_keeps_each_shards_media_in_its_own_slots(tiny_model):
    m, exs = tiny_model, _examples(tiny_model)
    kw = dict(seq_len=256, max_tiles=12, max_clips=8, max_frames=192, image_size=m.vit_cfg.image_size)
    col1, col4 = LMCollator(m.tokens_per_tile, **kw), LMCollator(m.tokens_per_tile, shards=4, **kw)
    one, four = col1(exs), col4(exs)
    assert not col1.skipped and not col4.skipped
    assert shards.media_local(four, 4, m.tokens_per_tile) and not shards.media_local(one, 4, m.tokens_per_tile)
    assert {k: np.shape(v) for k, v in four.items()} == {k: np.shape(v) for k, v in one.items()}  # same shapes
    # the same rows: the per-shard layout splices to exactly today's embeddings (so the same loss)
    np.testing.assert_array_equal(_embeds(m, four), _embeds(m, one))
    # grad_accum: micro-batches stacked on a leading axis, each checked on its own
    assert shards.media_local(stack_micro_batches([four, four]), 4, m.tokens_per_tile)
    assert not shards.media_local(stack_micro_batches([four, one]), 4, m.tokens_per_tile)
    # a second process's rows: its shards are 4..7 of the global arrays
    second = LMCollator(m.tokens_per_tile, shards=4, tile_offset=12, clip_offset=8, **kw)(exs)
    assert shards.media_local(second, 4, m.tokens_per_tile, (1, 2))
    assert not shards.media_local(second, 4, m.tokens_per_tile, (0, 2))


def test_packer_per_shard_keeps_media_local_and_resumes(tiny_model):
    m = tiny_model
    exs = _examples(m, 24, seed=1)
    stream = type("Cycle", (), {"__getitem__": lambda self, i: exs[i % len(exs)]})()  # an endless stream

    def parts():
        budget = lambda j: packing.Budget(rows=1, seq_len=256, tile_slots=3, clip_slots=0, frame_slots=192,  # noqa
                                          tokens_per_tile=m.tokens_per_tile, image_size=m.vit_cfg.image_size,
                                          tile_offset=3 * j, audio_groups=[[96, 1], [160, 1]], shard=(j, 2))
        return packing.ShardedBatches([packing.PackedBatches(stream, None, budget(j), shard=(j, 2), pool=8)
                                       for j in range(2)])
    it = parts()
    first = next(it)
    assert shards.media_local(first, 2, m.tokens_per_tile) and first["kind"].shape == (2, 256)
    assert [len(g) for g in first["audio_feats"]] == [2, 2] and len(first["pixels"]) == 6
    state = it.get_state()
    a = next(it)
    again = parts()
    again.set_state(state)
    b = next(again)
    for k in a:
        for x, y in zip(a[k] if isinstance(a[k], list) else [a[k]], b[k] if isinstance(b[k], list) else [b[k]]):
            np.testing.assert_array_equal(x, y)
    assert it.stats["steps"] == 2 and it.stats["examples"] >= 4
    with pytest.raises(ValueError, match="batch shard"):
        again.set_state({"shards": [state["shards"][0]]})


@pytest.mark.slow  # ~70 s on 2 cores (8-device compiles in a subprocess)
def test_media_stay_on_their_chip_from_2_to_8_devices():
    env = dict(os.environ, XLA_FLAGS=XLA_BASE)  # the session's, without a device count of its own
    p = subprocess.run([sys.executable, os.path.join(REPO, "tests", "splice_check.py")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=HANG_S)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads(line[0][7:])
    two, eight = r["2"], r["8"]
    assert two["err"] == eight["err"] == 0.0 and two["err_global"] == eight["err_global"] == 0.0, r
    # one row and its media per device: the shard-local splice moves nothing between devices at 2 or 8; the
    # global gather all-gathers every device's media for every device (the measure sees it, and it grows)
    assert two["local_bytes"] == eight["local_bytes"] == 0, r
    assert eight["global_bytes"] >= 3 * two["global_bytes"] > 0, r
    mixed = r["data2_fsdp2_tensor2"]  # the batch over data x fsdp, tensor left to XLA
    assert mixed["err"] == 0.0 and mixed["local_bytes"] == 0, r
    step = r["step"]
    assert step["media_local"] and step["step_marked"], step  # the pipeline's batch took the local splice
    assert not step["rev_local"] and not step["rev_marked"], step  # its tiles reversed: the global gather
    a, b, c = step["step_loss"]  # one device; 8 devices, local splice; 8 devices, the reversed batch
    assert abs(a - b) <= 1e-5 * abs(a) and abs(a - c) <= 1e-5 * abs(a), step
