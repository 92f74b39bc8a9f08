"""Image preprocessing as the official VITA-1.5 code does it (host side, numpy + Pillow).

``dynamic_preprocess`` picks a (cols, rows) grid of 1..max_num tiles closest to the image's aspect
ratio (ties: a larger grid wins only when the image area exceeds half of the grid's pixel area),
resizes with Pillow's default filter (BICUBIC), cuts row-major tiles and appends a thumbnail last
when there is more than one tile. Each tile then goes through the CLIP processor of the InternViT
folder: shortest-edge resize (BICUBIC), centre crop, rescale 1/255, ImageNet mean/std.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import IO, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from vita_jax.models.internvit import normalise_pixels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """An image cannot be used; the message names the file."""


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """The CLIP processor settings (``preprocessor_config.json`` of the InternViT folder)."""
    size: int = 448
    crop_size: int = 448
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    resample: int = 3  # PIL BICUBIC



def _one_line(e: BaseException) -> str:
    """An exception's message on one line (decoders sometimes put newlines in theirs)."""
    return " ".join(str(e).split()) or type(e).__name__


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    """``image.convert("RGB")`` of the image's 8-bit equivalent.

    8-bit modes (``1``, ``L``, ``P``/``PA`` (transparency dropped), ``RGB``, ``RGBA``, ``LA``,
    ``CMYK``, ``YCbCr``, ...) go straight through Pillow's ``convert("RGB")``, as the official
    loader does (``RGB`` / ``L`` bit-identical to it). Pillow alone would clip 16-bit and 32-bit
    grey levels at 255 and truncate floats, so: ``I;16*`` (16-bit grey) -> ``round(v / 257)``;
    ``I`` (32-bit integers) -> as 8-bit when every value is in 0..255, as 16-bit when in
    0..65535, refused otherwise; ``F`` (float) -> ``round(v * 255)`` when every value is in
    [0, 1], refused otherwise. 16-bit-per-channel RGB(A) files are reduced to 8 bits by Pillow's
    own decoder (high byte) and arrive as ``RGB`` / ``RGBA``."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        v = np.asarray(image).astype(np.int64)
        lo, hi = (int(v.min()), int(v.max())) if v.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageError(f"{name}: {mode} image with values {lo}..{hi}: only 0..255 (8-bit) or 0..65535 "
                             "(16-bit) grey levels can be converted to RGB")
        if mode == "I" and hi <= 255:  # 8-bit values stored as 32-bit integers: Pillow's conversion is exact
            v8 = v
        else:
            v8 = (v + 128) // 257  # round(v / 257): 65535 -> 255, exact on multiples of 257
        return Image.fromarray(v8.astype(np.uint8)).convert("RGB")
    if mode == "F":
        v = np.asarray(image, np.float64)
        if v.size and not (np.isfinite(v).all() and v.min() >= 0.0 and v.max() <= 1.0):
            lo, hi = np.nanmin(v), np.nanmax(v)
            raise ImageError(f"{name}: 32-bit float image with values {lo:g}..{hi:g}"
                             f"{' (NaN or infinite included)' if not np.isfinite(v).all() else ''}: only values in "
                             "[0, 1] can be converted to RGB (scaled by 255)")
        return Image.fromarray(np.round(v * 255.0).astype(np.uint8)).convert("RGB")
    try:
        with warnings.catch_warnings():  # P with byte transparency: Pillow suggests RGBA; RGB drops it anyway
            warnings.filterwarnings("ignore", message="Palette images with Transparency")
            return image.convert("RGB")
    except (ValueError, OSError) as e:  # e.g. "La": no conversion to RGB in Pillow
        raise ImageError(f"{name}: cannot convert a {mode} image to RGB: {_one_line(e)}") from e


def load_image(image: Union[str, os.PathLike, IO[bytes], Image.Image]) -> Image.Image:
    """A path, binary file object (e.g. ``io.BytesIO`` of the encoded file; its ``name``, if set,
    names it in errors) or PIL image -> RGB PIL image: ``.convert("RGB")`` like the official
    loader for 8-bit images (alpha dropped, palette / grayscale / CMYK converted), 16-bit and
    float images first reduced to their 8-bit equivalent (:func:`_to_rgb`). A missing, empty,
    truncated, corrupt or non-image file raises :class:`ImageError` (one line, naming the file)."""
    name = "<PIL image>"
    if not isinstance(image, Image.Image):
        is_file = hasattr(image, "read")
        name = str(getattr(image, "name", "<image bytes>")) if is_file else os.fspath(image)
        if not is_file and os.path.isfile(name) and os.path.getsize(name) == 0:
            raise ImageError(f"{name}: empty file (0 bytes), not an image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(image if is_file else name)
                w, h = img.size
                if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                    raise ImageError(f"{name}: {w}x{h} pixels is over Pillow's decompression-bomb limit "
                                     f"({Image.MAX_IMAGE_PIXELS} pixels)")
                img.load()
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"{name}: over Pillow's decompression-bomb limit: {_one_line(e)}") from e
        except FileNotFoundError as e:
            raise ImageError(f"{name}: no such image file") from e
        except UnidentifiedImageError as e:
            raise ImageError(f"{name}: not an image Pillow can read (unknown format, empty or corrupt data)") from e
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated / corrupt data, a folder, ...
            raise ImageError(f"{name}: cannot read image (truncated or corrupt?): {_one_line(e)}") from e
        image = img
    if image.size[0] < 1 or image.size[1] < 1:
        raise ImageError(f"{name}: zero-size image ({image.size[0]}x{image.size[1]})")
    return _to_rgb(image, name)


def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Candidate (cols, rows) grids in the official order (sorted by tile count; the order inside a
    count is that of the official Python set, reproduced by building the same set)."""
    ratios = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                 if min_num <= i * j <= max_num)
    return sorted(ratios, key=lambda x: x[0] * x[1])


def find_closest_aspect_ratio(width: int, height: int, ratios: Sequence[tuple[int, int]], image_size: int):
    """The official grid choice, tie rule included."""
    aspect = width / height
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for cols, rows in ratios:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def choose_grid(width: int, height: int, image_size: int = 448, max_num: int = 12, min_num: int = 1):
    return find_closest_aspect_ratio(width, height, target_ratios(min_num, max_num), image_size)


def dynamic_preprocess(image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448,
                       use_thumbnail: bool = True) -> list[Image.Image]:
    """Tiles of ``image_size``², row-major, then the thumbnail (only when more than one tile)."""
    w, h = image.size
    cols, rows = choose_grid(w, h, image_size, max_num, min_num)
    resized = image.resize((image_size * cols, image_size * rows))
    tiles = [resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
             for r in range(rows) for c in range(cols)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def clip_tile(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """One image through the CLIP processor's resize and crop -> uint8 ``[3, crop, crop]`` (RGB)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = cfg.size, int(cfg.size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=cfg.resample)
    arr = np.asarray(image, dtype=np.uint8)
    c = cfg.crop_size
    if arr.shape[0] < c or arr.shape[1] < c:  # HF pads with zeros before cropping
        padded = np.zeros((max(c, arr.shape[0]), max(c, arr.shape[1]), 3), np.uint8)
        top, left = (padded.shape[0] - arr.shape[0]) // 2, (padded.shape[1] - arr.shape[1]) // 2
        padded[top:top + arr.shape[0], left:left + arr.shape[1]] = arr
        arr = padded
    top, left = (arr.shape[0] - c) // 2, (arr.shape[1] - c) // 2
    return np.ascontiguousarray(arr[top:top + c, left:left + c].transpose(2, 0, 1))


def clip_preprocess(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """One image through the CLIP processor -> float32 ``[3, crop, crop]`` (rescaled, normalised)."""
    return normalise_pixels(clip_tile(image, cfg), cfg.mean, cfg.std)


def preprocess_image(image, cfg: ImageProcessorConfig | None = None, max_num: int = 12, min_num: int = 1,
                     use_thumbnail: bool = True, return_tiles: bool = False, normalise: bool = True):
    """A path, binary file object or PIL image -> ``[tiles, 3, S, S]`` (S = ``cfg.crop_size``):
    float32 normalised pixel values (the official ``pixel_values``), or with ``normalise=False``
    the uint8 RGB tiles they are computed from (what the host batches carry; the model normalises
    them, :func:`~vita_jax.models.internvit.normalise_pixels`). With ``return_tiles`` also the
    uint8 tiles ``[tiles, S, S, 3]`` before the CLIP processor."""
    cfg = cfg or ImageProcessorConfig()
    img = load_image(image)
    tiles = dynamic_preprocess(img, min_num, max_num, cfg.crop_size, use_thumbnail)
    pixels = np.stack([clip_tile(t, cfg) for t in tiles])
    if normalise:
        pixels = normalise_pixels(pixels, cfg.mean, cfg.std)
    if return_tiles:
        return pixels, np.stack([np.asarray(t, np.uint8) for t in tiles])
    return pixels
