"""Bounded host memory: pixels travel as uint8 tiles and are normalised inside the jitted model to
bitwise the host processor's values; calibration keeps sizes, never pixels or features; the
packer reads about one step ahead. 16-bit / float / palette / CMYK images become their 8-bit RGB; bad image
files are one line naming the file."""
import gc
import io
import os
import weakref

import jax
import numpy as np
import pytest
from PIL import Image

from vita_jax.data import batch as batch_lib
from vita_jax.data import image as I
from vita_jax.data import packing, pipeline
from vita_jax.models.internvit import normalise_pixels

from conftest import one_line


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


# ------------------------------------------------------------------ media that cannot work: one line naming the file


U8 = (np.arange(24 * 40) * 37 % 256).astype(np.uint8).reshape(24, 40)  # every grey level 0..255 appears


def _rgb(grey):
    return np.repeat(np.asarray(grey, np.uint8)[..., None], 3, axis=-1)


def _saved(tmp_path, im, name):
    im.save(tmp_path / name)
    return str(tmp_path / name)


@pytest.mark.parametrize("case", ["I;16 png", "I;16 tiff", "I;16B", "I over 255", "I within 0..255", "F tiff"])
def test_deep_images_convert_as_their_8bit_equivalent(tmp_path, case):
    v16 = U8.astype(np.uint16) * 257  # 16-bit of the 8-bit image: exact
    v16[0, :4] = [128, 129, 65535 - 128, 65534]  # and the rounding: round(v / 257) -> 0, 1, 255, 255
    want16 = U8.copy()
    want16[0, :4] = [0, 1, 255, 255]
    im, want = {
        "I;16 png": (lambda: Image.open(_saved(tmp_path, Image.fromarray(v16), "a.png")), want16),
        "I;16 tiff": (lambda: Image.open(_saved(tmp_path, Image.fromarray(v16), "a.tif")), want16),
        "I;16B": (lambda: Image.frombytes("I;16B", (40, 24), v16.astype(">u2").tobytes()), want16),
        "I over 255": (lambda: Image.fromarray(v16.astype(np.int32)), want16),
        "I within 0..255": (lambda: Image.fromarray(U8.astype(np.int32)), U8),
        "F tiff": (lambda: Image.open(_saved(tmp_path, Image.fromarray(U8.astype(np.float32) / 255), "a.tif")), U8),
    }[case]
    im = im()
    assert im.mode in ("I;16", "I;16B", "I", "F")
    out = I.load_image(im)
    assert out.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(out), _rgb(want))
    if case != "I within 0..255":  # what Pillow alone gives: clipped to white / black
        assert not np.array_equal(np.asarray(im.convert("RGB")), _rgb(want))


@pytest.mark.parametrize("values, what", [([0.0, 2.0], "0..2"), ([0.0, np.nan], "NaN"), ([-0.5, 0.5], "-0.5..0.5")])
def test_float_outside_unit_range_refused(tmp_path, values, what):
    a = np.zeros((8, 8), np.float32)
    a[0, :2] = values
    path = _saved(tmp_path, Image.fromarray(a), "depth.tif")
    with pytest.raises(I.ImageError) as e:
        I.preprocess_image(path)
    one_line(e, "depth.tif", what, "[0, 1]")


def test_int_outside_16bit_range_refused(tmp_path):
    path = _saved(tmp_path, Image.fromarray(np.asarray([[-3, 70000]], np.int32)), "signed.tif")
    with pytest.raises(I.ImageError) as e:
        I.load_image(path)
    one_line(e, "signed.tif", "-3..70000")


def test_8bit_modes_as_pil_converts_them(tmp_path):
    """Palette (with transparency), 1-bit, LA, RGBA, CMYK: the official ``convert("RGB")``, checked
    against the 8-bit pixels each file holds; RGB and L files stay bit-identical to Pillow's."""
    rgb = np.stack([U8, U8[::-1], 255 - U8], -1)
    pal = Image.fromarray(U8 % 4).convert("L").convert("P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)
    pal.info["transparency"] = 0
    bits = U8 > 127
    cases = {
        "p.png": (pal, np.asarray([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]], np.uint8)[U8 % 4]),
        "one.png": (Image.fromarray(bits), _rgb(bits * 255)),
        "la.png": (Image.fromarray(np.stack([U8, 255 - U8], -1), "LA"), _rgb(U8)),
        "rgba.png": (Image.fromarray(np.concatenate([rgb, U8[..., None]], -1)), rgb),
        "rgb.png": (Image.fromarray(rgb), rgb),
        "l.png": (Image.fromarray(U8), _rgb(U8)),
    }
    for name, (im, want) in cases.items():
        path = _saved(tmp_path, im, name)
        assert Image.open(path).mode == {"p.png": "P", "one.png": "1", "la.png": "LA", "rgba.png": "RGBA",
                                         "rgb.png": "RGB", "l.png": "L"}[name]
        out = np.asarray(I.load_image(path))
        np.testing.assert_array_equal(out, want, err_msg=name)
        np.testing.assert_array_equal(out, np.asarray(Image.open(path).convert("RGB")), err_msg=name)
    cmyk = _saved(tmp_path, Image.fromarray(rgb).convert("CMYK"), "cmyk.jpg")
    assert Image.open(cmyk).mode == "CMYK"
    np.testing.assert_array_equal(np.asarray(I.load_image(cmyk)), np.asarray(Image.open(cmyk).convert("RGB")))


def test_bad_image_files_are_one_line(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.stack([U8] * 3, -1)).resize((400, 300)).save(buf, "JPEG")
    files = {"zero.jpg": b"", "cut.jpg": buf.getvalue()[:len(buf.getvalue()) // 2],
             "notes.png": b"just some text\n" * 9, "garbage.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(I.ImageError) as e:
            I.preprocess_image(str(tmp_path / name))
        one_line(e, name)
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(I.ImageError) as e:
        I.load_image(str(tmp_path / "folder.png"))
    one_line(e, "folder.png")
