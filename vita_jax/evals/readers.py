"""Readers of the formats public benchmarks ship in (all local files, nothing downloaded).

* LibriSpeech: ``ROOT/SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt`` (``ID TRANSCRIPT`` lines) beside
  ``ID.flac`` (or ``.wav``); ROOT may be a split folder (``test-other``) or any folder above one.
* JSON / JSONL manifests: a JSON list or one object a line; relative media paths are relative to
  the manifest's folder.
* VLMEvalKit TSV: a header row, then one question a row; ``image`` holds base64 bytes, or the
  ``index`` of the row whose image it shares (MMBench does this for circular copies).
"""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import sys
from typing import Optional


def read_manifest(path: str) -> list[dict]:
    """A JSON list or a JSONL file -> its objects (each must be a JSON object)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            rows = json.loads(stripped)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON or JSONL ({e})") from e
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    if bad:
        raise ValueError(f"{path}: entry {bad[0]} is not a JSON object")
    return rows


def media_path(root: str, value) -> Optional[str]:
    """A manifest's media field as a path (relative ones under ``root``); None when empty."""
    if value is None or value == "":
        return None
    value = str(value)
    return value if os.path.isabs(value) else os.path.join(root, value)


def require(row: dict, fields, where: str) -> None:
    """Raises ``ValueError`` naming the first missing field of ``row``."""
    for f in fields:
        if row.get(f) in (None, ""):
            raise ValueError(f"{where}: no {f!r} field")


def librispeech(root: str) -> list[dict]:
    """``[{id, audio, text}]`` of every ``*.trans.txt`` under ``root``, sorted by id."""
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".trans.txt"):
                continue
            with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    uid, _, text = line.strip().partition(" ")
                    audio = next((os.path.join(dirpath, uid + ext) for ext in (".flac", ".wav")
                                  if os.path.exists(os.path.join(dirpath, uid + ext))), None)
                    if audio is None:
                        raise FileNotFoundError(f"{os.path.join(dirpath, name)} line {n}: no {uid}.flac or "
                                                f"{uid}.wav beside it")
                    out.append(dict(id=uid, audio=audio, text=text))
    if not out:
        raise ValueError(f"{root}: no *.trans.txt found (a LibriSpeech folder: SPEAKER/CHAPTER/*.trans.txt + *.flac)")
    return sorted(out, key=lambda r: r["id"])


def read_tsv(path: str) -> list[dict]:
    """A VLMEvalKit TSV -> rows (dicts of strings); ``image`` fields that name another row's
    ``index`` are replaced by that row's image."""
    csv.field_size_limit(sys.maxsize)  # base64 images are far larger than csv's default field limit
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise ValueError(f"{path}: no rows (a VLMEvalKit TSV has a header row and one question a row)")
    if "index" not in rows[0]:
        raise ValueError(f"{path}: no 'index' column (columns: {', '.join(rows[0])})")
    images = {r["index"]: r.get("image") for r in rows}
    for r in rows:
        img = r.get("image") or ""
        if img and len(img) <= 64 and img in images:  # a reference to another row's image
            r["image"] = images[img]
    return rows


def image_bytes(b64: str, where: str) -> bytes:
    """Decoded base64 image bytes (``ValueError`` naming the row when they are not base64)."""
    try:
        return base64.b64decode(b64, validate=False)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: the 'image' field is not base64 ({e})") from e


def as_file(media):
    """Bytes -> a binary file object (what the image and video readers take); paths unchanged."""
    return io.BytesIO(media) if isinstance(media, (bytes, bytearray)) else media
