"""Vision path against the official fixture: tiling, CLIP pixels, InternViT, pixel shuffle, projector."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vita_jax.data import image as I
from vita_jax.models import internvit, projectors

from conftest import rel_err

PHOTOS = ["img0_astronaut_150x90.png", "img1_coffee_60x200.png", "img2_chelsea_56x56.png",
          "img3_astronaut_120x64.png"]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def vision_ref(tiny_dir):
    return np.load(os.path.join(tiny_dir, "reference/vision.npz"))


def test_vit_hidden_states(model, vision_ref):
    vit = internvit.InternViT(model.vit_cfg, keep_hidden=True)
    last, hidden = jax.jit(lambda p, x: vit.apply({"params": p}, x))(model.params["vision_tower"],
                                                                     vision_ref["pixel_values"])
    assert hidden.shape == vision_ref["vit_hidden_states"].shape
    assert rel_err(hidden, vision_ref["vit_hidden_states"]) <= 1e-5
    assert rel_err(last, vision_ref["vit_last_hidden_state"]) <= 1e-5
    shuffled = projectors.pixel_shuffle(jnp.asarray(vision_ref["vit_last_hidden_state"]))
    assert rel_err(shuffled, vision_ref["features_pixel_shuffled"]) <= 1e-5


def test_encode_images_equals_projector_output(model, vision_ref):
    out = model.encode_images(vision_ref["pixel_values"])
    assert out.shape == (3, 4, 64) and out.dtype == np.float32
    assert rel_err(out, vision_ref["projector_out"]) <= 1e-5
    # a tile alone gives the same rows (padding to a bucket does not leak)
    assert rel_err(model.encode_images(vision_ref["pixel_values"][1:2])[0], vision_ref["projector_out"][1]) <= 1e-5


@pytest.mark.parametrize("k", range(4))
def test_tiles_and_pixels_equal_official(model, tiny_dir, k):
    ref = np.load(os.path.join(tiny_dir, "reference/image_preproc.npz"))
    path = os.path.join(tiny_dir, "reference", PHOTOS[k])
    pixels, tiles = I.preprocess_image(path, model.image_processor, max_num=6, return_tiles=True)
    assert tiles.shape == ref[f"img{k}_tiles_uint8"].shape  # same count, same size
    np.testing.assert_array_equal(tiles, ref[f"img{k}_tiles_uint8"])  # same order and pixels
    assert np.abs(pixels - ref[f"img{k}_pixel_values"]).max() <= 1e-5
    assert np.abs(model.preprocess_image(path, max_num=6) - ref[f"img{k}_pixel_values"]).max() <= 1e-5


def test_clip_only_path(model, tiny_dir):
    ref = np.load(os.path.join(tiny_dir, "reference/image_preproc.npz"))
    img = I.load_image(os.path.join(tiny_dir, "reference/cliponly_coffee_150x90.png"))
    np.testing.assert_array_equal(np.asarray(img), ref["cliponly_source_uint8"])
    assert np.abs(I.clip_preprocess(img, model.image_processor) - ref["cliponly_pixel_values"][0]).max() <= 1e-5


def test_grid_choice_official_table(tiny_dir):
    with open(os.path.join(tiny_dir, "reference/cases.json")) as f:
        table = json.load(f)["notes"]["grid_table"]
    assert len(table) >= 20
    for r in table:
        got = I.choose_grid(r["width"], r["height"], r["image_size"], r["max_num"])
        assert got == (r["grid_cols"], r["grid_rows"]), r


# worked by hand from the rule in spec §2.3 (448 px tiles, max 12): closest ratio, ties to the
# larger grid only when the image area exceeds 0.5 * 448^2 * cols * rows
SPEC_CASES = [((448, 448), (1, 1)), ((896, 448), (2, 1)), ((1920, 1080), (4, 2)), ((500, 2000), (1, 4)),
              ((640, 480), (4, 3)), ((1024, 768), (4, 3)), ((3000, 3000), (3, 3))]


@pytest.mark.parametrize("size,grid", SPEC_CASES)
def test_grid_choice_spec_examples(size, grid):
    assert I.choose_grid(*size, image_size=448, max_num=12) == grid


def test_modes_convert_like_official(tmp_path):
    """8-bit modes: Pillow's convert("RGB"), as the official loader (16-bit / float: test_data_image.py)."""
    rgb = (np.arange(20 * 30 * 3) % 251).astype(np.uint8).reshape(20, 30, 3)
    for mode in ("L", "RGBA", "P", "CMYK", "LA", "1"):
        im = Image.fromarray(rgb).convert(mode)
        out = I.load_image(im)
        assert out.mode == "RGB" and out.size == (30, 20)
        expected = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(np.asarray(out), expected)


def test_bad_images_named(tmp_path, monkeypatch):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(I.ImageError, match="corrupt.png"):
        I.preprocess_image(str(corrupt))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(I.ImageError, match="empty.jpg"):
        I.preprocess_image(str(empty))
    with pytest.raises(I.ImageError, match="zero-size"):
        I.preprocess_image(Image.new("RGB", (0, 5)))
    with pytest.raises(I.ImageError, match="missing.png"):
        I.preprocess_image(str(tmp_path / "missing.png"))
    big = tmp_path / "bomb.png"
    Image.new("RGB", (200, 100)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(I.ImageError, match="bomb.png.*decompression-bomb"):
        I.preprocess_image(str(big))


def test_extreme_shapes_tile(tmp_path):
    cfg = I.ImageProcessorConfig(size=56, crop_size=56)
    one = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(one)
    assert I.preprocess_image(str(one), cfg).shape == (1, 3, 56, 56)
    strip = tmp_path / "strip.png"
    Image.new("RGB", (1, 5000), (0, 255, 0)).save(strip)
    px = I.preprocess_image(str(strip), cfg, max_num=12)
    assert px.shape == (13, 3, 56, 56)  # 1x12 grid + thumbnail
    assert np.isfinite(px).all()


@pytest.mark.parametrize("n_in,n_out", [(4, 4), (4, 6), (4, 3), (32, 40), (32, 20), (3, 7)])
def test_pos_embed_resize_matches_torch_bicubic(n_in, n_out):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(n_in * n_in, 5)).astype(np.float32)
    got = np.asarray(internvit.resize_pos_embed(jnp.asarray(x), n_in, n_out, n_out + 1))
    t = torch.from_numpy(x).reshape(1, n_in, n_in, 5).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(t, size=(n_out, n_out + 1), mode="bicubic", align_corners=False)
    ref = ref.reshape(1, 5, -1).permute(0, 2, 1)[0].numpy()
    assert np.abs(got - ref).max() <= 1e-5


def test_vit_other_resolution_runs(model):
    """84 px tiles (6x6 patches) resize the 4x4 trained position grid and give 9 tokens per tile."""
    vit = internvit.InternViT(model.vit_cfg)
    out = vit.apply({"params": model.params["vision_tower"]}, np.zeros((1, 3, 84, 84), np.float32))
    assert out.shape == (1, 37, 64)
    assert projectors.pixel_shuffle(out).shape == (1, 9, 256)
