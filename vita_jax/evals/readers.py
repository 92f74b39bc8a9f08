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


def read_text(path: str, newline: Optional[str] = None) -> str:
    """A data file's text: a folder or a file that is not UTF-8 is a ``ValueError`` naming it."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: a folder; this task reads a file (see README: Evaluation)")
    try:
        with open(path, encoding="utf-8", newline=newline) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_manifest(path: str) -> list[tuple[str, dict]]:
    """A JSON list or a JSONL file -> ``(where, object)`` of each entry: ``where`` = ``PATH entry I`` (a list)
    or ``PATH line N`` (JSONL: the file's own line number); a torn line or an entry that is not a JSON object
    is a ``ValueError`` naming it."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            rows = [(f"{path} entry {i}", r) for i, r in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {e.lineno}: not JSON ({e.msg}, column {e.colno})") from None
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{path} line {n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n}: not JSON ({e.msg}, column {e.colno}); a JSONL file holds "
                                     "one object a line") from None
    bad = next((w for w, r in rows if not isinstance(r, dict)), None)
    if bad:
        raise ValueError(f"{bad}: not a JSON object")
    return rows


def media_path(root: str, value) -> Optional[str]:
    """A manifest's media field as a path (relative ones under ``root``); None when empty."""
    if value is None or value == "":
        return None
    value = str(value)
    return value if os.path.isabs(value) else os.path.join(root, value)


TEXT_FIELDS = ("question", "text", "audio", "video", "image")  # a string when given (texts, media paths)


def require(row: dict, fields, where: str) -> None:
    """Raises ``ValueError`` naming the first missing field of ``row`` (or a text / media field that is not
    a string)."""
    for f in fields:
        if row.get(f) in (None, "") or (isinstance(row[f], str) and not row[f].strip()):
            raise ValueError(f"{where}: no {f!r} field" if row.get(f) in (None, "") else f"{where}: {f!r} is blank")
    for f in TEXT_FIELDS:
        if row.get(f) is not None and not isinstance(row[f], str):
            raise ValueError(f"{where}: {f!r} must be a string, got {type(row[f]).__name__} {row[f]!r}")


def librispeech(root: str) -> list[dict]:
    """``[{id, audio, text, where}]`` of every ``*.trans.txt`` under ``root``, sorted by id."""
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".trans.txt"):
                continue
            path = os.path.join(dirpath, name)
            for n, line in enumerate(read_text(path).splitlines(), 1):
                if not line.strip():
                    continue
                uid, _, text = line.strip().partition(" ")
                if not text.strip():
                    raise ValueError(f"{path} line {n}: {uid} has no transcript (a line is 'ID TRANSCRIPT')")
                audio = next((os.path.join(dirpath, uid + ext) for ext in (".flac", ".wav")
                              if os.path.exists(os.path.join(dirpath, uid + ext))), None)
                if audio is None:
                    raise FileNotFoundError(f"{path} line {n}: no {uid}.flac or {uid}.wav beside it")
                out.append(dict(id=uid, audio=audio, text=text, where=f"{path} line {n}"))
    if not out:
        raise ValueError(f"{root}: no *.trans.txt found (a LibriSpeech folder: SPEAKER/CHAPTER/*.trans.txt + *.flac)")
    return sorted(out, key=lambda r: r["id"])


def read_tsv(path: str) -> list[dict]:
    """A VLMEvalKit TSV -> rows (dicts of strings, ``where``: ``PATH line N (index I)``); ``image`` fields
    that name another row's ``index`` are replaced by that row's image. A row without a numeric ``index``
    or with more cells than the header is a ``ValueError`` naming its line."""
    csv.field_size_limit(sys.maxsize)  # base64 images are far larger than csv's default field limit
    rows = []
    reader = csv.DictReader(io.StringIO(read_text(path, newline=""), newline=""), delimiter="\t")
    try:
        for r in reader:
            rows.append((reader.line_num, r))
    except csv.Error as e:
        raise ValueError(f"{path} line {reader.line_num}: not a TSV row ({e})") from None
    if not rows:
        raise ValueError(f"{path}: no rows (a VLMEvalKit TSV has a header row and one question a row)")
    if "index" not in rows[0][1]:
        raise ValueError(f"{path}: no 'index' column (columns: {', '.join(map(str, rows[0][1]))})")
    for n, r in rows:
        try:
            int(float(r["index"]))
        except (TypeError, ValueError):
            raise ValueError(f"{path} line {n}: index {r['index']!r} is not a number") from None
        if None in r:  # csv's key for the cells past the header's
            raise ValueError(f"{path} line {n} (index {r['index']}): {len(r) - 1 + len(r[None])} cells, the header "
                             f"has {len(r) - 1} (a tab inside a field?)")
        r["where"] = f"{path} line {n} (index {r['index']})"
    rows = [r for _, r in rows]
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


def as_file(media, name: Optional[str] = None):
    """Bytes -> a binary file object (what the image and video readers take) named ``name`` in their errors;
    paths unchanged."""
    if not isinstance(media, (bytes, bytearray)):
        return media
    f = io.BytesIO(media)
    if name:
        f.name = name
    return f


def located(where: str, e: BaseException) -> ValueError:
    """``e``'s one-line message as a ``ValueError`` that starts with ``where`` (the file and row of an
    example), unless it does already."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return ValueError(msg if msg.startswith(where) else f"{where}: {msg}")
