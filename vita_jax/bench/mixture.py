"""A VITA-like training mixture in the official JSON format, with real photos and real speech, for
``bench data`` (``python -m vita_jax.bench mixture --out DIR``, then ``bench data`` on
``DIR/mixture.json``).

The shape of stage 2.2's data (the VITA-1.5 report's mixture, in proportions): image captions of
2-7 tiles, multi-tile VQA of 5-13 tiles, spoken questions of 2-15 s (half with an image), and
texts of 40-600 tokens. Photos are scikit-image's bundled pictures cropped and resized to the
tile grids the official dynamic tiling then cuts (448 px tiles + a thumbnail); speech is the
CMU ARCTIC recordings bundled with vita_jax, joined (with short pauses) to the drawn duration.
Texts are drawn from the recordings' words. Deterministic from ``seed``.
"""
from __future__ import annotations

import json
import os

import numpy as np
import soundfile as sf
from PIL import Image

from vita_jax import assets

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "immunohistochemistry", "coins",
          "moon")  # all inside scikit-image's wheel (no download)
# (share of samples, kind): the mixture's make-up
KINDS = ((0.3, "caption"), (0.2, "vqa"), (0.3, "speech"), (0.2, "text"))


def _photo(name: str) -> Image.Image:
    from skimage import data as skdata  # scikit-image imports ~1 s; only when a mixture is written
    im = getattr(skdata, name)()
    if im.ndim == 2:
        im = np.stack([im] * 3, -1)
    return Image.fromarray(np.asarray(im[..., :3], np.uint8))


def _grid(tiles: int, rng) -> tuple[int, int]:
    """A (cols, rows) tile grid giving ``tiles`` tiles with the thumbnail (one tile: no thumbnail)."""
    if tiles == 1:
        return 1, 1
    n = tiles - 1
    pairs = [(c, n // c) for c in range(1, n + 1) if n % c == 0]
    return pairs[int(rng.integers(len(pairs)))]


def _image(rng, photos, tiles: int, size: int = 448) -> Image.Image:
    cols, rows = _grid(tiles, rng)
    im = photos[int(rng.integers(len(photos)))]
    w, h = cols * size, rows * size
    # crop the photo to the grid's aspect ratio, then resize: the tiling picks exactly that grid
    W, H = im.size
    if W / H > w / h:
        cw = int(H * w / h)
        x = int(rng.integers(0, W - cw + 1))
        im = im.crop((x, 0, x + cw, H))
    else:
        ch = int(W * h / w)
        y = int(rng.integers(0, H - ch + 1))
        im = im.crop((0, y, W, y + ch))
    return im.resize((w, h), Image.BICUBIC)


def _speech(rng, clips, seconds: float) -> np.ndarray:
    out, n = [], 0
    while n < seconds * 16000:
        wav = clips[int(rng.integers(len(clips)))][1]
        out += [wav, np.zeros(int(0.2 * 16000), np.float32)]
        n += len(wav) + int(0.2 * 16000)
    return np.concatenate(out)[:int(seconds * 16000)].astype(np.float32)


def write_mixture(out: str, n: int = 400, seed: int = 0) -> str:
    """Writes ``n`` samples to ``out/mixture.json`` (media in ``out/media``); returns the JSON path."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out, "media"), exist_ok=True)
    photos = [_photo(p) for p in PHOTOS]
    clips = assets.speech_clips()
    words = " ".join(t for *_, t in clips).replace(",", "").replace(".", "").lower().split()

    def text(tokens: int) -> str:  # ~1.3 tokens a word for these words under Qwen2's tokenizer
        return " ".join(rng.choice(words, max(1, int(tokens / 1.3)))) + "."

    samples = []
    shares = np.cumsum([s for s, _ in KINDS])
    for i in range(n):
        kind = KINDS[int(np.searchsorted(shares, rng.uniform() * shares[-1], side="right"))][1]
        s = {"id": f"{kind}-{i}"}
        human, reply = "", text(int(rng.integers(20, 120)))
        if kind in ("caption", "vqa") or (kind == "speech" and rng.uniform() < 0.5):
            tiles = int(rng.integers(2, 8)) if kind != "vqa" else int(rng.integers(5, 14))
            name = f"media/img{i:05d}.jpg"
            _image(rng, photos, tiles).save(os.path.join(out, name), quality=90)
            s["image"] = name
            human += "<image>\n"
        if kind == "speech":
            name = f"media/wav{i:05d}.wav"
            sf.write(os.path.join(out, name), _speech(rng, clips, float(rng.uniform(2, 15))), 16000)
            s["audio"] = [name]
            human += "<audio>\n"
        elif kind == "caption":
            human += "Describe the image."
        elif kind == "vqa":
            human += text(int(rng.integers(10, 40)))
        else:
            human, reply = text(int(rng.integers(20, 300))), text(int(rng.integers(20, 300)))
        s["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": reply}]
        samples.append(s)
    path = os.path.join(out, "mixture.json")
    with open(path, "w") as f:
        json.dump(samples, f)
    return path
