"""Bounded host memory: pixels travel as uint8 tiles and are normalised inside the jitted model to
bitwise the host processor's values; calibration keeps sizes, never pixels or features; the
packer reads about one step ahead."""
import gc
import os
import weakref

import jax
import numpy as np
import pytest

from vita_jax.data import batch as batch_lib
from vita_jax.data import image as I
from vita_jax.data import packing, pipeline
from vita_jax.models.internvit import normalise_pixels


def test_device_normalisation_is_bitwise_the_host_processors():
    cfg = I.ImageProcessorConfig()
    every = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16), (2, 3, 16, 16))
    rng = np.random.default_rng(0)
    tiles = np.concatenate([every, rng.integers(0, 256, (3, 3, 16, 16), dtype=np.uint8)])
    # today's processor arithmetic on the host, channels last: x / 255, - mean, / std, all float32
    x = tiles.transpose(0, 2, 3, 1).astype(np.float32) / np.float32(255.0)
    ref = ((x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)).transpose(0, 3, 1, 2)
    dev = np.asarray(jax.jit(lambda t: normalise_pixels(t, cfg.mean, cfg.std))(tiles))
    assert dev.dtype == np.float32 and dev.tobytes() == ref.tobytes()
    assert normalise_pixels(tiles, cfg.mean, cfg.std).tobytes() == ref.tobytes()


def test_model_takes_uint8_tiles_or_normalised_pixels_alike(tiny_model, tiny_dir):
    m = tiny_model
    path = os.path.join(tiny_dir, "reference", "img0_astronaut_150x90.png")  # several tiles and a thumbnail
    raw = m.prep.tiles(path)  # the host pipeline's: uint8
    floats = m.preprocess_image(path)  # the official pixel_values
    assert raw.dtype == np.uint8 and floats.dtype == np.float32 and raw.shape == floats.shape
    a, b = m.encode_images(raw), m.encode_images(floats)
    assert np.array_equal(a, b)
    arrays, _ = m.batch(np.asarray([[1, -200, 2] + [-200] * (len(raw) - 1)]), pixel_values=raw)
    assert arrays["pixels"].dtype == np.uint8


def test_tiles_of_both_kinds_in_one_batch_refused():
    with pytest.raises(ValueError, match="mixes uint8 tiles and float"):
        batch_lib.concat_tiles([np.zeros((1, 3, 4, 4), np.uint8), np.zeros((1, 3, 4, 4), np.float32)], 4)
    assert batch_lib.concat_tiles([], 4).dtype == np.uint8


class _Examples:
    """A dataset of examples with big pixels and clips whose arrays are tracked by weak references."""

    def __init__(self, n):
        self.n, self.refs = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        tiles = 1 + i % 3
        ids = np.asarray([5] * 10 + [-200] * tiles + [-500] + [7] * 10, np.int64)
        ex = dict(id=str(i), input_ids=ids, labels=ids.copy(), pixels=np.zeros((tiles, 3, 16, 16), np.uint8),
                  audio=[np.zeros((100 + 10 * (i % 5), 80), np.float32)])
        self.refs += [weakref.ref(ex["pixels"]), weakref.ref(ex["audio"][0])]
        return ex


def _config():
    from vita_jax.train import stages  # the stage defaults: only for these data settings
    c = stages.stage_config("2.2", "tiny")
    c.data.update(seq_len=128, max_tiles_per_sample=3, max_frames=160, calibration_examples=64, packing=True)
    c.vision.image_size = 16
    c.update(batch_size=2, grad_accum=1)
    return c


def test_calibration_keeps_no_pixels_or_features():
    ds = _Examples(10 ** 6)
    tiles, groups, report = pipeline.calibrate(_config(), ds, None, dict(local=2, index=0, count=1, accum=1), 2)
    gc.collect()
    assert report["examples"] == 64 and tiles >= 3 and groups
    assert len(ds.refs) == 128 and not any(r() is not None for r in ds.refs), "calibration kept example arrays"


def test_packer_reads_about_one_step_ahead():
    ds = _Examples(10 ** 6)
    lay = dict(local=2, index=0, count=1, accum=1)
    budget = pipeline.packing_budget(_config(), lay)
    it = packing.PackedBatches(ds, None, budget, workers=2)
    held = []  # examples held (read ahead, waiting) after each step
    for _ in range(12):
        next(it)
        held.append(len(it._cache) + len(set(it.pending) - set(it._cache)))
    it._workers.shutdown(wait=True)
    # about a step's candidates and a step's read-ahead, not the pool of 64 x rows, and not growing
    assert max(held) < it.pool / 3 and max(held[6:]) <= max(held[:6]), (held, it.pool)
