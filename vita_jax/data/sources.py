"""Data sources in the official VITA format: a JSON list of samples with ``conversations`` and
``image`` / ``audio`` / ``video`` paths (strings or lists), optional ``set`` (a folder key),
``inserted_id`` and ``end_tag``; several files mixed with weights.

:class:`OfficialExamples` turns a sample into an example for :class:`~vita_jax.data.batch.LMCollator`
(tiles, frames, fbank, ids and SFT labels exactly as the official loader, with the preprocessing
settings of :func:`~vita_jax.data.batch.preprocess_settings`: what inference uses). A sample that cannot be
used (unreadable media, placeholder/media count mismatch, bad fields, any exception) becomes ``{"id", "bad"}``:
the collator drops it, counts it and logs its id; the run goes on. :class:`OfficialJSON` checks the
file's shape once when opened (one warning listing every unusable sample; ``ValueError`` when none is usable).
Media paths stay inside their media root (:func:`media_path`): an absolute path or a ``..`` / symlink
escape is a bad sample unless the source allows it (``allow_outside_root``).

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
    ``sets[sample["set"]]`` when the sample names a declared set, else against ``media_root``
    (default: the JSON file's folder; the working directory when ``path`` is already a list of
    samples), and must stay inside that folder (:func:`media_path`) unless ``allow_outside_root``."""

    def __init__(self, path, media_root: Optional[str] = None, sets: Optional[dict] = None,
                 allow_outside_root: bool = False):
        if isinstance(path, (list, tuple)):  # samples in memory (e.g. for write_tfds)
            self.samples, path = list(path), "<samples>"
            media_root = media_root or os.getcwd()
        else:
            try:
                with open(path) as f:
                    self.samples = json.load(f)
            except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
                raise ValueError(f"{path}: cannot read the data file: {e}") from e
        if not isinstance(self.samples, list):
            raise ValueError(f"{path}: expected a JSON list of samples")
        self.path = path
        # the file's shape, checked once: an unusable sample is reported here and becomes a bad sample
        self.problems = {i: p for i, p in ((i, sample_problem(x)) for i, x in enumerate(self.samples)) if p}
        if self.problems and len(self.problems) == len(self.samples):
            first = "; ".join(f"{self._sid(i)}: {p}" for i, p in list(self.problems.items())[:3])
            raise ValueError(f"{path}: no usable sample among {len(self.samples)} ({first})")
        if not self.samples:
            raise ValueError(f"{path}: no samples (an empty JSON list)")
        if self.problems:
            log.warning("%s: %d of %d samples are unusable and will be skipped: %s", path, len(self.problems),
                        len(self.samples), "; ".join(f"{self._sid(i)}: {p}" for i, p in self.problems.items()))
        self.root = media_root or os.path.dirname(os.path.abspath(path))
        self.sets = dict(sets or {})
        self.allow_outside_root = bool(allow_outside_root)

    def __len__(self):
        return len(self.samples)

    def _sid(self, i):
        x = self.samples[i]
        return x["id"] if isinstance(x, dict) and "id" in x else f"{os.path.basename(self.path)}#{int(i)}"

    def __getitem__(self, i):
        i = int(i)
        s = dict(self.samples[i]) if isinstance(self.samples[i], dict) else {}
        s["id"] = self._sid(i)
        if i in self.problems:
            s["_bad"] = self.problems[i]
        s["_root"], s["_sets"] = self.root, self.sets  # resolved by media_path, in the transform (never raises here)
        if self.allow_outside_root:
            s["_outside_ok"] = True
        return s


def media_path(sample: dict, name, k: int = 0) -> str:
    """The file of media ``name`` of a sample from :class:`OfficialJSON`: ``name`` joined to its
    folder, the ``k``-th (or last) of the sample's ``set`` names (a folder declared in ``sets``, else
    that name under the media root) or, without a set, the media root (``_root``; the working
    directory for a bare sample).

    Contained: the path, symlinks resolved, must lie inside its media root (a declared set's
    folder, else the media root), so an absolute ``name`` or one that escapes with ``..`` or a
    symlink raises ``ValueError`` (a bad sample) unless the sample's source allows it
    (``allow_outside_root``, marked ``_outside_ok``)."""
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"media name {name!r}: expected a string path")
    name, root = os.fspath(name), sample.get("_root") or os.getcwd()
    folder = bound = root
    set_names = _as_list(sample.get("set"))
    if set_names:
        n = set_names[min(k, len(set_names) - 1)]
        declared = sample.get("_sets") or {}
        if n in declared:
            folder = bound = declared[n]
        else:  # an undeclared set is a folder of the media root, contained in it
            folder = os.path.join(root, str(n))
    path = os.path.join(folder, name)
    if sample.get("_outside_ok"):
        return path
    if os.path.isabs(name):
        raise ValueError(f"{name}: an absolute media path, outside the media root {bound} (media paths are relative "
                         "to it; allow_outside_root: true on the mixture entry or "
                         "config.data.allow_outside_media_root=true allows them)")
    real, real_bound = os.path.realpath(path), os.path.realpath(bound)
    if os.path.commonpath([real, real_bound]) != real_bound:
        raise ValueError(f"{name}: resolves to {real}, outside the media root {bound} (a '..' or a symlink; "
                         "allow_outside_root: true on the mixture entry or config.data.allow_outside_media_root=true "
                         "allows it)")
    return path


def sample_problem(sample) -> Optional[str]:
    """Why a sample of an official file cannot be trained on (None: its shape is fine): a dict with a
    non-empty ``conversations`` list of ``{"from": "human"|"gpt", "value": str}`` dicts, alternating
    human/gpt (a leading gpt message is dropped, as the official loader does)."""
    if not isinstance(sample, dict):
        return f"not a dict (a JSON {type(sample).__name__ if sample is not None else 'null'})"
    conv = sample.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "'conversations' is missing or not a non-empty list" if not isinstance(conv, list) else \
            "'conversations' is empty"
    for k, m in enumerate(conv):
        if not isinstance(m, dict) or m.get("from") not in text_lib.ROLES or not isinstance(m.get("value"), str):
            return f"conversations[{k}] needs 'from' in {sorted(text_lib.ROLES)} and a string 'value'"
    roles = [m["from"] for m in conv]
    roles = roles[1:] if roles[0] == "gpt" else roles
    if not roles:
        return "no human message"
    if any(r != ("human", "gpt")[j % 2] for j, r in enumerate(roles)):
        return "roles must alternate human/gpt"
    return None


def _as_list(x) -> list:
    return [] if x is None else (list(x) if isinstance(x, (list, tuple)) else [x])


class OfficialExamples:
    """Sample -> example (``input_ids``, ``labels``, ``pixels``, ``audio``), or ``{"id", "bad"}``."""

    def __init__(self, tokenizer, prep: Preprocess):
        self.tok, self.prep = tokenizer, prep

    def _source(self, sample, kind, k, name, root_k=0):
        """The ``k``-th ``kind`` media of the sample: ``io.BytesIO`` of its bytes (named ``name``
        so errors and formats know the file) when the sample carries ``_media``, else its path."""
        media = sample.get("_media")
        if media is None:
            return media_path(sample, name, root_k)
        blobs = media.get(kind) or []
        if k >= len(blobs):
            raise ValueError(f"{name}: no in-memory bytes for {kind} #{k}")
        f = io.BytesIO(blobs[k])
        f.name = str(name)
        return f

    def __call__(self, sample):
        sid = sample.get("id", "?") if isinstance(sample, dict) else "?"
        try:
            if not isinstance(sample, dict):
                raise TypeError(f"a sample must be a dict, got {type(sample).__name__}")
            return self._convert(sample)
        except Exception as e:  # bad media, bad fields, anything one sample does: skip, count, never crash
            log.warning("bad sample %s: %s", sid, e)
            return {"id": sid, "bad": f"{type(e).__name__}: {e}"}

    def _convert(self, sample):
        sid = sample.get("id", "?")
        if sample.get("_bad"):  # marked unusable when it was stored (e.g. a media file was missing)
            raise ValueError(sample["_bad"])
        images, videos, audios = (_as_list(sample.get("image")), _as_list(sample.get("video")),
                                  _as_list(sample.get("audio")))
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
            raise ValueError(f"{n_img} <image> positions for {n_tiles} tiles/frames of "
                             f"{len(images) + len(videos)} media")
        if n_aud != len(clips):
            raise ValueError(f"{n_aud} <audio> placeholders for {len(clips)} audio files")
        ex = {"id": sid, "input_ids": ids, "labels": labels}
        if pixels:
            ex["pixels"] = np.concatenate(pixels)
        if clips:
            ex["audio"] = clips
        return ex
