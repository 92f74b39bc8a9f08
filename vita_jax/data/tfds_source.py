"""Official-format VITA samples stored as a self-contained TFDS dataset (``array_record`` files,
random access through ``tfds`` data sources / grain), media bytes embedded.

:func:`write_tfds` converts a JSON list of samples (see :mod:`vita_jax.data.sources`) into
``<out_dir>/<name>/<version>/``; :class:`TFDSSource` reads it back as samples in the
:class:`~vita_jax.data.sources.OfficialJSON` format whose media travel in memory
(``_media``), ready for :class:`~vita_jax.data.sources.OfficialExamples`.

One record per sample (all strings UTF-8):

* ``id``: text; ``conversations``: text, the JSON of the list ("" when the sample had none);
* ``image`` / ``audio`` / ``video``: sequences of the files' raw bytes (encoded images, audio
  and video files as they are on disk, not decoded), and ``image_names`` / ``audio_names`` /
  ``video_names``: the names as written in the JSON, aligned with the bytes (so the extension and
  error messages keep the file);
* ``extra``: JSON of the other fields (``set``, ``inserted_id``, ``end_tag``, ...);
* ``bad``: always "" for datasets written now (a sample that cannot be used is not written);
  datasets of earlier versions may hold why a sample could not be used: reading gives ``_bad``
  and ``OfficialExamples`` turns it into ``{"id", "bad"}``.

Works without TensorFlow: ``tfds.dataset_builders.store_as_tfds_dataset`` itself does not (its
builder checks ``isinstance(x, tf.data.Dataset)`` and looks for ``importlib_resources``), so a
small subclass of its ``AdhocBuilder`` skips both.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.dataset_builders import adhoc_builder

from vita_jax.data.batch import check_media
from vita_jax.data.sources import OfficialJSON, _as_list, media_path

log = logging.getLogger(__name__)

MEDIA = ("image", "audio", "video")
_CORE = ("id", "conversations") + MEDIA
_SINGLE = "_str"  # key in ``extra``: media fields that were one string, not a list (restored as such)


def features() -> tfds.features.FeaturesDict:
    """The record layout described in the module docstring."""
    blobs = tfds.features.Sequence(tfds.features.Scalar(np.object_))  # variable-length raw bytes
    spec = {"id": tfds.features.Text(), "conversations": tfds.features.Text(),
            "extra": tfds.features.Text(), "bad": tfds.features.Text()}
    for kind in MEDIA:
        spec[kind] = blobs
        spec[f"{kind}_names"] = tfds.features.Sequence(tfds.features.Text())
    return tfds.features.FeaturesDict(spec)


class _Builder(adhoc_builder.AdhocBuilder, skip_registration=True):
    """``AdhocBuilder`` without TensorFlow: splits are iterables of ``(key, record)``."""

    # The base class finds its source folder (to look for download checksums) through
    # ``importlib_resources``, a package tfds 4.9.10 imports but no longer declares; we download nothing.
    code_path = None

    def _split_generators(self, dl_manager):
        # The base class asks ``isinstance(x, tf.data.Dataset)``, which imports TensorFlow.
        return dict(self._split_datasets)


def _record(s: dict) -> dict:
    """One sample -> its record; raises (naming the file) when a media file is outside its media
    root, cannot be read, or does not decode as its kind."""
    rec = {"id": str(s["id"]), "conversations": json.dumps(s["conversations"], default=str)}
    single = []
    for kind in MEDIA:
        if isinstance(s.get(kind), str):
            single.append(kind)
        names, blobs = _as_list(s.get(kind)), []
        for k, name in enumerate(names):
            # same path resolution as OfficialExamples (contained; images use root k of their ``set`` list)
            path = media_path(s, name, k if kind == "image" else 0)
            try:
                with open(path, "rb") as f:
                    blobs.append(f.read())
            except OSError as e:
                raise ValueError(f"{name}: cannot read the {kind} file {path}: {e.strerror or e}") from e
            f = io.BytesIO(blobs[-1])
            f.name = str(name)
            check_media(kind, f)  # only bytes that decode as their kind are stored
        rec[kind], rec[f"{kind}_names"] = blobs, [str(n) for n in names]
    extra = {k: v for k, v in s.items() if k not in _CORE and not k.startswith("_")}
    if single:
        extra[_SINGLE] = single
    rec["extra"], rec["bad"] = json.dumps(extra, default=str), ""
    return rec


def _records(src: OfficialJSON, problems: dict):
    """``(key, record)`` for every usable sample of ``src``; each unusable one (bad shape, media
    outside the media root, unreadable or not decoding as its kind) goes to ``problems[id]``."""
    for i in range(len(src)):
        s = src[i]
        sid = str(s["id"])
        try:
            if s.get("_bad"):
                raise ValueError(s["_bad"])
            rec = _record(s)
        except Exception as e:  # any problem of one sample: reported by id, never written
            problems[sid] = " ".join(str(e).split()) or type(e).__name__
            log.warning("write_tfds: sample %s not written: %s", sid, problems[sid])
            continue
        yield i, rec


def write_tfds(samples_or_json_path: str | Sequence[dict], out_dir: str, name: str = "vita_sft",
               split: str = "train", media_root: str | None = None, version: str = "1.0.0",
               sets: dict | None = None, on_bad: str = "skip", allow_outside_root: bool = False) -> str:
    """Official-format samples (a JSON file's path, or the list itself) -> a TFDS dataset in
    ``array_record`` files under ``out_dir/name/version``; returns that folder.

    Media paths resolve as in :class:`~vita_jax.data.sources.OfficialJSON` (``sets[sample["set"]]``,
    else ``media_root``, default the JSON's folder or, for a list, the working directory) and must
    stay inside that folder unless ``allow_outside_root`` (:func:`~vita_jax.data.sources.media_path`).
    Only bytes that decode as their declared kind are stored (each file is decoded once: the image,
    the audio, the video's frames). A sample that fails (bad shape, a media file outside the root,
    missing, unreadable or not decoding) is never written: ``on_bad="skip"`` (default) writes the
    others and logs one warning listing every skipped sample by id with its reason;
    ``on_bad="refuse"`` writes nothing and raises ``ValueError`` listing every problem. Records keep
    the samples' order (no shuffling at write time: grain shuffles at read time).

    Written to a temporary folder inside ``out_dir`` and moved into place only when complete: an
    error (or a refused write) leaves nothing behind, and a killed write's folder is removed by the next.
    Raises ``FileExistsError`` if that dataset version is already there, ``ValueError`` when no sample
    is usable."""
    if on_bad not in ("skip", "refuse"):
        raise ValueError(f"on_bad must be 'skip' or 'refuse', got {on_bad!r}")
    src = OfficialJSON(samples_or_json_path, media_root, sets, allow_outside_root)
    final = os.path.join(os.fspath(out_dir), name, version)
    if os.path.exists(final):
        raise FileExistsError(f"{final}: TFDS dataset {name} {version} already exists")
    os.makedirs(out_dir, exist_ok=True)
    for left in sorted(n for n in os.listdir(out_dir) if re.fullmatch(re.escape(f".{name}-{version}.writing-") +
                                                                      r"[a-z0-9_]{8}", n)):  # a killed write's
        log.warning("write_tfds: removing %s, left by an interrupted write", os.path.join(out_dir, left))
        shutil.rmtree(os.path.join(out_dir, left), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-{version}.writing-", dir=out_dir)
    problems: dict[str, str] = {}
    try:
        builder = _Builder(name=name, version=version, features=features(),
                           split_datasets={split: _records(src, problems)}, data_dir=tmp, disable_shuffling=True,
                           description="VITA official-format samples with embedded media (vita_jax.data.tfds_source)")
        cfg = tfds.download.DownloadConfig(try_download_gcs=False)
        # tfds makes a downloads/ folder even with nothing to download
        try:
            builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"), download_config=cfg,
                                         file_format="array_record")
        except Exception:
            if len(problems) < len(src):
                raise
            # no sample usable: whatever tfds says about an empty split, the message below says why
        listed = "; ".join(f"{sid}: {why}" for sid, why in problems.items())
        if problems and (on_bad == "refuse" or len(problems) == len(src)):
            raise ValueError(f"write_tfds {src.path}: {len(problems)} of {len(src)} samples are unusable, nothing "
                             f"written: {listed}")
        if problems:
            log.warning("write_tfds %s: %d of %d samples not written: %s", src.path, len(problems), len(src), listed)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(os.fspath(builder.data_dir), final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class TFDSSource:
    """Random access over a dataset written by :func:`write_tfds` -> samples as
    ``OfficialJSON.__getitem__`` gives them, plus ``_media = {kind: [bytes, ...]}`` (aligned with
    the sample's ``image`` / ``audio`` / ``video`` names) and ``_bad`` for samples stored bad.

    ``name_or_dir``: a version folder (``.../vita_sft/1.0.0``, the one holding
    ``dataset_info.json``), a dataset folder (``.../vita_sft``: its newest version), or a dataset
    name (``"vita_sft"`` or ``"vita_sft:1.0.0"``) looked up in ``data_dir`` (default: TFDS's)."""

    def __init__(self, name_or_dir: str, split: str = "train", data_dir: str | None = None):
        self.name, self.split = os.fspath(name_or_dir), split
        where = f"TFDS dataset {self.name!r} (split {split!r}" + (f", data_dir {data_dir!r})" if data_dir else ")")
        try:
            if os.path.isfile(os.path.join(self.name, "dataset_info.json")):
                self.ds = tfds.builder_from_directory(self.name).as_data_source(split)
            elif os.path.isdir(self.name) and data_dir is None:
                root = os.path.normpath(self.name)
                self.ds = tfds.data_source(os.path.basename(root), split=split, data_dir=os.path.dirname(root),
                                           download=False)
            else:
                self.ds = tfds.data_source(self.name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises many types (not found, bad split, bad files): name what we opened
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]  # not-found lists every tfds dataset
            raise ValueError(f"{where}: cannot open: {msg}") from e
        missing = set(features().keys()) - set(self.ds.dataset_info.features.keys())
        if missing:
            raise ValueError(f"{where}: not a vita_jax dataset (no {sorted(missing)} features)")

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        r = self.ds[int(i)]
        s = {"id": _text(r["id"])}
        conv = _text(r["conversations"])
        if conv:
            s["conversations"] = json.loads(conv)
        extra = json.loads(_text(r["extra"]) or "{}")
        single = extra.pop(_SINGLE, [])
        s.update(extra)
        s["_media"] = {}
        for kind in MEDIA:
            names = [_text(n) for n in r[f"{kind}_names"]]
            if names:
                s[kind] = names[0] if kind in single and len(names) == 1 else names
                s["_media"][kind] = [bytes(b) for b in r[kind]]
        if _text(r["bad"]):
            s["_bad"] = _text(r["bad"])
        return s
