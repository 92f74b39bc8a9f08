"""Data sources in the official VITA format: a JSON list of samples with ``conversations`` and
``image`` / ``audio`` / ``video`` paths (strings or lists), optional ``set`` (a folder key),
``inserted_id`` and ``end_tag``; several files mixed with weights.

:class:`OfficialExamples` turns a sample into an example for :class:`~vita_jax.data.batch.LMCollator`
(tiles, frames, fbank, ids and SFT labels exactly as the official loader, with the preprocessing
settings of :func:`~vita_jax.data.batch.preprocess_settings`: what inference uses). A sample that cannot be
used (unreadable media, placeholder/media count mismatch, bad fields) becomes ``{"id", "bad"}``:
the collator drops it, counts it and logs its id; the run goes on.

Samples may also carry their media in memory (:class:`~vita_jax.data.tfds_source.TFDSSource`):
``_media = {"image": [bytes, ...], "audio": [...], "video": [...]}`` aligned with the names in
``image`` / ``audio`` / ``video``; ``_bad`` (a message) marks a sample known to be unusable.
"""
from __future__ import annotations

import io
import json
import logging
import os
from typing import Optional

import numpy as np

from vita_jax.data import text as text_lib
from vita_jax.data.batch import Preprocess

log = logging.getLogger(__name__)


class OfficialJSON:
    """Random access over one official JSON file. Media paths are resolved against
    ``sets[sample["set"]]`` when the sample names a set, else against ``media_root`` (default: the
    JSON file's folder; the working directory when ``path`` is already a list of samples)."""

    def __init__(self, path, media_root: Optional[str] = None, sets: Optional[dict] = None):
        if isinstance(path, (list, tuple)):  # samples in memory (e.g. for write_tfds)
            self.samples, path = list(path), "<samples>"
            media_root = media_root or os.getcwd()
        else:
            try:
                with open(path) as f:
                    self.samples = json.load(f)
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: cannot read the data file: {e}") from e
        if not isinstance(self.samples, list):
            raise ValueError(f"{path}: expected a JSON list of samples")
        self.path = path
        self.root = media_root or os.path.dirname(os.path.abspath(path))
        self.sets = dict(sets or {})

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = dict(self.samples[int(i)])
        s.setdefault("id", f"{os.path.basename(self.path)}#{int(i)}")
        s["_roots"] = self._roots(s)
        s["_root"] = self.root
        return s

    def _roots(self, s):
        sets = s.get("set")
        if sets is None:
            return None
        names = sets if isinstance(sets, list) else [sets]
        return [self.sets.get(n, os.path.join(self.root, n)) for n in names]


def _as_list(x) -> list:
    return [] if x is None else (list(x) if isinstance(x, (list, tuple)) else [x])


class OfficialExamples:
    """Sample -> example (``input_ids``, ``labels``, ``pixels``, ``audio``), or ``{"id", "bad"}``."""

    def __init__(self, tokenizer, prep: Preprocess):
        self.tok, self.prep = tokenizer, prep

    @staticmethod
    def _path(sample, name, k=0):
        roots = sample.get("_roots")
        if os.path.isabs(name):
            return name
        root = roots[min(k, len(roots) - 1)] if roots else sample.get("_root", ".")
        return os.path.join(root, name)

    def _source(self, sample, kind, k, name, root_k=0):
        """The ``k``-th ``kind`` media of the sample: ``io.BytesIO`` of its bytes (named ``name``
        so errors and formats know the file) when the sample carries ``_media``, else its path."""
        media = sample.get("_media")
        if media is None:
            return self._path(sample, name, root_k)
        blobs = media.get(kind) or []
        if k >= len(blobs):
            raise ValueError(f"{name}: no in-memory bytes for {kind} #{k}")
        f = io.BytesIO(blobs[k])
        f.name = str(name)
        return f

    def __call__(self, sample):
        sid = sample.get("id", "?")
        try:
            return self._convert(sample)
        except (ValueError, KeyError, OSError, TypeError) as e:  # bad media, bad fields: skip, never crash
            log.warning("bad sample %s: %s", sid, e)
            return {"id": sid, "bad": f"{type(e).__name__}: {e}"}

    def _convert(self, sample):
        sid = sample.get("id", "?")
        if sample.get("_bad"):  # marked unusable when it was stored (e.g. a media file was missing)
            raise ValueError(sample["_bad"])
        images, videos, audios = _as_list(sample.get("image")), _as_list(sample.get("video")), _as_list(sample.get("audio"))
        pixels, tiles, frames = [], [], 0
        for k, name in enumerate(images):
            px = self.prep.tiles(self._source(sample, "image", k, name, k))
            pixels.append(px)
            tiles.append(len(px))
        for k, name in enumerate(videos):
            px = self.prep.frames(self._source(sample, "video", k, name))
            pixels.append(px)
            frames = len(px)
        clips = [self.prep.fbank(self._source(sample, "audio", k, name)) for k, name in enumerate(audios)]
        modality = "video" if videos else "image" if images else "lang"
        ids, labels = text_lib.encode_sample(sample, self.tok, modality, tiles, frames)
        n_img, n_aud = int((ids == text_lib.IMAGE_TOKEN_INDEX).sum()), int((ids == text_lib.AUDIO_TOKEN_INDEX).sum())
        n_tiles = sum(tiles) + (frames if videos else 0)
        if n_img != n_tiles:
            raise ValueError(f"{n_img} <image> positions for {n_tiles} tiles/frames of {len(images) + len(videos)} media")
        if n_aud != len(clips):
            raise ValueError(f"{n_aud} <audio> placeholders for {len(clips)} audio files")
        ex = {"id": sid, "input_ids": ids, "labels": labels}
        if pixels:
            ex["pixels"] = np.concatenate(pixels)
        if clips:
            ex["audio"] = clips
        return ex
