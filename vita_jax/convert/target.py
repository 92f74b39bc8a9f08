"""Where a checkpoint is written (a release folder or a vita_jax checkpoint), so that nothing of the
user's is lost: a target that is, contains or lies inside its source is refused; ``overwrite`` replaces
only a folder holding nothing but what vita_jax writes; the files go to a temporary sibling that is
committed atomically; and the temporary siblings a killed write left behind are removed (or, for an
overwrite killed between its two renames, the previous target is put back) by the next write.

Temporary names, next to the target ``T`` (nothing else is ever removed): ``T.partial-XXXXXXXX`` (a
write in progress, ``tempfile.mkdtemp``'s 8 characters), ``T.partial-XXXXXXXX.old`` (the previous
``T`` during a commit) and ``T.partial`` (the shared folder of a multi-process write).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from typing import Callable, Optional

from vita_jax import paths

log = logging.getLogger(__name__)

ORBAX_META = "vita_jax.json"  # the mark of a complete vita_jax checkpoint (written last)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "generation_config.json")
# every top-level name a vita_jax checkpoint or release folder is written with (tower folders: config.json's)
WRITTEN = {"params", ORBAX_META, "vita_tts_ckpt", "ticodec", "config.json", "model.safetensors",
           "model.safetensors.index.json", *TOKENIZER_FILES}
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors$")


def check_target(dst: str, *sources: Optional[str]) -> None:
    """Refuses (``ValueError`` naming both) a target that is one of ``sources``, contains one or lies
    inside one (real paths, symlinks resolved), before anything is written or deleted: an
    overwrite would delete the weights being converted."""
    def real(p):
        p = str(p)
        return os.path.realpath(p) if paths.is_local(p) else p.rstrip("/")
    d = real(dst)
    for src in sources:
        if not src:
            continue
        s = real(src)
        if d == s:
            raise ValueError(f"target {dst} is the source {src}: write to another folder")
        if d.startswith(s.rstrip("/") + "/"):
            raise ValueError(f"target {dst} lies inside the source {src}: write to a folder outside it")
        if s.startswith(d.rstrip("/") + "/"):
            raise ValueError(f"target {dst} contains the source {src}: write to a folder outside it")


def _towers(dst: str) -> set:
    """The relative tower folders a release folder's ``config.json`` names (written with it)."""
    try:
        with paths.open(paths.join(dst, "config.json")) as f:
            hf = json.load(f)
    except (OSError, ValueError):
        return set()
    names = (hf.get(k) for k in ("mm_vision_tower", "mm_audio_encoder")) if isinstance(hf, dict) else ()
    return {n for n in names if isinstance(n, str) and n and "/" not in n.rstrip("/")}


def check_overwrite(dst: str, overwrite: bool) -> None:
    """``dst`` must be missing or empty, or (with ``overwrite``) hold only what vita_jax writes (a
    vita_jax checkpoint or release folder, complete or not): anything else is refused, naming it."""
    if not (paths.isdir(dst) and paths.listdir(dst)):
        if paths.exists(dst) and not paths.isdir(dst):
            raise FileExistsError(f"{dst} is a file, not a folder: write to another path")
        return
    if not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    allowed = WRITTEN | _towers(dst)
    foreign = sorted(n for n in paths.listdir(dst) if n not in allowed and not SHARD.match(n))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{dst} holds {shown}, which vita_jax did not write: --overwrite replaces only a "
                              "checkpoint vita_jax wrote; move those away or write to another folder")


def _leftover(base: str, name: str) -> Optional[str]:
    """``"tmp"`` / ``"old"`` for a temporary sibling name of the target ``base``, else None."""
    m = re.fullmatch(re.escape(base) + r"\.partial(-[a-z0-9_]{8}(\.old)?)?", name)
    return None if m is None else "old" if m.group(2) else "tmp"


def clean_leftovers(dst: str, say: Callable[[str], None] = log.warning) -> list[str]:
    """Removes the temporary siblings of the local target ``dst`` left by a killed write (one line
    each through ``say``); a previous target moved aside by a commit killed half-way is put back when
    ``dst`` is missing. Returns the lines."""
    if not paths.is_local(dst):
        return []
    dst = os.path.abspath(dst)
    parent, base = os.path.split(dst)
    if not os.path.isdir(parent):
        return []
    found = sorted((kind, n) for n in os.listdir(parent) if (kind := _leftover(base, n)))
    lines = []
    for kind, name in found:  # "old" sorts first: put back before the write's own folder is removed
        path = os.path.join(parent, name)
        if kind == "old" and not os.path.exists(dst):
            os.replace(path, dst)
            lines.append(f"{dst}: put back from {name} (an overwrite was interrupted before it completed)")
        else:
            shutil.rmtree(path, ignore_errors=True)
            lines.append(f"{dst}: removed {name}, left by an interrupted write")
    for line in lines:
        say(line)
    return lines


def prepare_target(dst: str, overwrite: bool) -> str:
    """A fresh temporary sibling folder of ``dst`` to write into (after the leftovers of killed
    writes are cleaned and ``dst`` is checked with :func:`check_overwrite`); :func:`commit` moves it
    into place."""
    if not paths.is_local(dst):  # os.path would turn gs://b/x into a local folder named gs:
        raise ValueError(f"{dst}: this format is written to a local disk (a vita_jax/orbax checkpoint can go to a URL)")
    dst = os.path.abspath(dst)
    clean_leftovers(dst)
    check_overwrite(dst, overwrite)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=os.path.basename(dst) + ".partial-", dir=parent)


def commit(tmp: str, dst: str) -> None:
    """Moves the finished ``tmp`` to ``dst``; a previous ``dst`` is moved aside first (``tmp.old``) and
    removed last, so a kill at any point leaves either target, and :func:`clean_leftovers` repairs it."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst):
        old = tmp + ".old"
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
