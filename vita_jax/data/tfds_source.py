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
* ``bad``: "" or why the sample cannot be used (a media file that could not be read at write
  time): reading gives ``_bad`` and ``OfficialExamples`` turns it into ``{"id", "bad"}``.

Works without TensorFlow: ``tfds.dataset_builders.store_as_tfds_dataset`` itself does not (its
builder checks ``isinstance(x, tf.data.Dataset)`` and looks for ``importlib_resources``), so a
small subclass of its ``AdhocBuilder`` skips both.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.dataset_builders import adhoc_builder

from vita_jax.data.sources import OfficialExamples, OfficialJSON, _as_list

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


def _records(src: OfficialJSON):
    """``(key, record)`` for every sample of ``src``; media read from disk, never raises on them."""
    for i in range(len(src)):
        s = src[i]
        sid = str(s["id"])
        rec = {"id": sid, "conversations": json.dumps(s["conversations"], default=str) if "conversations" in s else ""}
        bad, single = [], []
        for kind in MEDIA:
            if isinstance(s.get(kind), str):
                single.append(kind)
            names, blobs = _as_list(s.get(kind)), []
            for k, name in enumerate(names):
                try:  # same path resolution as OfficialExamples: images use root k of their ``set`` list
                    with open(OfficialExamples._path(s, name, k if kind == "image" else 0), "rb") as f:
                        blobs.append(f.read())
                except (OSError, TypeError, ValueError) as e:  # keep the sample, marked bad at read time
                    log.warning("write_tfds: sample %s: cannot read %s file %s: %s", sid, kind, name, e)
                    bad.append(f"{name}: {kind} file could not be read when the dataset was written: {e}")
                    blobs.append(b"")
            rec[kind], rec[f"{kind}_names"] = blobs, [str(n) for n in names]
        extra = {k: v for k, v in s.items() if k not in _CORE and not k.startswith("_")}
        if single:
            extra[_SINGLE] = single
        rec["extra"], rec["bad"] = json.dumps(extra, default=str), "; ".join(bad)
        yield i, rec


def write_tfds(samples_or_json_path: str | Sequence[dict], out_dir: str, name: str = "vita_sft",
               split: str = "train", media_root: str | None = None, version: str = "1.0.0",
               sets: dict | None = None) -> str:
    """Official-format samples (a JSON file's path, or the list itself) -> a TFDS dataset in
    ``array_record`` files under ``out_dir/name/version``; returns that folder.

    Media paths resolve as in :class:`~vita_jax.data.sources.OfficialJSON` (``sets[sample["set"]]``,
    else ``media_root``, default the JSON's folder or, for a list, the working directory). Records
    keep the samples' order (no shuffling at write time: grain shuffles at read time). A media file
    that cannot be read is logged (sample id, file) and stored empty with the sample marked bad.
    Raises ``FileExistsError`` if that dataset version is already there."""
    src = OfficialJSON(samples_or_json_path, media_root, sets)
    builder = _Builder(name=name, version=version, features=features(), split_datasets={split: _records(src)},
                       data_dir=out_dir, disable_shuffling=True,
                       description="VITA official-format samples with embedded media (vita_jax.data.tfds_source)")
    if builder.is_prepared():
        raise FileExistsError(f"{builder.data_dir}: TFDS dataset {name} {version} already exists")
    cfg = tfds.download.DownloadConfig(try_download_gcs=False)
    with tempfile.TemporaryDirectory() as tmp:  # tfds makes a downloads/ folder even with nothing to download
        builder.download_and_prepare(download_dir=tmp, download_config=cfg, file_format="array_record")
    return os.fspath(builder.data_dir)


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
