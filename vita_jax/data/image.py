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



def load_image(image: Union[str, os.PathLike, IO[bytes], Image.Image]) -> Image.Image:
    """A path, binary file object (e.g. ``io.BytesIO`` of the encoded file; its ``name``, if set,
    names it in errors) or PIL image -> RGB PIL image (``.convert("RGB")`` like the official
    loader: alpha is dropped, palette / grayscale / CMYK converted). Errors name the file."""
    name = "<PIL image>"
    if not isinstance(image, Image.Image):
        is_file = hasattr(image, "read")
        name = str(getattr(image, "name", "<image bytes>")) if is_file else os.fspath(image)
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
            raise ImageError(f"{name}: over Pillow's decompression-bomb limit: {e}") from e
        except FileNotFoundError as e:
            raise ImageError(f"{name}: no such image file") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{name}: cannot read image: {e}") from e
        image = img
    if image.size[0] < 1 or image.size[1] < 1:
        raise ImageError(f"{name}: zero-size image ({image.size[0]}x{image.size[1]})")
    return image.convert("RGB")


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


def clip_preprocess(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """One image through the CLIP processor -> float32 ``[3, crop, crop]``."""
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
    arr = arr[top:top + c, left:left + c]
    x = arr.astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_image(image, cfg: ImageProcessorConfig | None = None, max_num: int = 12, min_num: int = 1,
                     use_thumbnail: bool = True, return_tiles: bool = False):
    """A path, binary file object or PIL image -> float32 ``[tiles, 3, S, S]`` (S =
    ``cfg.crop_size``); with ``return_tiles`` also the uint8 tiles ``[tiles, S, S, 3]`` before the
    CLIP processor."""
    cfg = cfg or ImageProcessorConfig()
    img = load_image(image)
    tiles = dynamic_preprocess(img, min_num, max_num, cfg.crop_size, use_thumbnail)
    pixels = np.stack([clip_preprocess(t, cfg) for t in tiles])
    if return_tiles:
        return pixels, np.stack([np.asarray(t, np.uint8) for t in tiles])
    return pixels
