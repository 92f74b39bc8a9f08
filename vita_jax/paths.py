"""The one path layer: every file the trainer, exporter, checkpointer and evaluators read or write
goes through here, so a work dir may be a local folder or an object-storage URL (``gs://``,
``s3://``, ...). URLs go through ``etils.epath`` (the library orbax already uses; ``gs://`` needs
``gcsfs`` or TensorFlow installed); local paths go straight to ``os``/``open``, exactly as before.

Object stores have no append and no atomic folder rename, so two helpers stage locally:
:func:`appender` (an append-only text file, e.g. ``metrics.jsonl``) and :class:`Staged` (a local
folder, e.g. TensorBoard's, mirrored to the URL); both upload every ``every_s`` seconds and at close.
"""
from __future__ import annotations

import builtins
import contextlib
import os
import posixpath
import shutil
import tempfile
import time
from typing import Iterator, Sequence

from etils import epath

SYNC_SECONDS = 60.0


def is_local(path) -> bool:
    """True for a plain filesystem path, False for a URL (``scheme://...``)."""
    return "://" not in os.fspath(path)


def _p(path) -> epath.Path:
    return epath.Path(os.fspath(path))


def join(base, *parts: str) -> str:
    """``os.path.join`` for local paths; ``/``-joined for URLs (never an OS separator)."""
    base = os.fspath(base)
    return os.path.join(base, *parts) if is_local(base) else posixpath.join(base, *parts)


def for_orbax(path):
    """What orbax is given: an absolute local path, or an ``epath.Path`` of the URL (orbax writes the
    arrays with tensorstore's own drivers, e.g. its native ``gs://`` driver)."""
    return os.path.abspath(path) if is_local(path) else _p(path)


def exists(path) -> bool:
    return os.path.exists(path) if is_local(path) else _p(path).exists()


def isdir(path) -> bool:
    return os.path.isdir(path) if is_local(path) else _p(path).is_dir()


def listdir(path) -> list[str]:
    """The names in a folder (not full paths)."""
    return os.listdir(path) if is_local(path) else [c.name for c in _p(path).iterdir()]


def makedirs(path) -> None:
    """Creates ``path`` and its parents; no error when it exists."""
    if is_local(path):
        os.makedirs(path, exist_ok=True)
    else:
        _p(path).mkdir(parents=True, exist_ok=True)


def rmtree(path) -> None:
    """Removes a folder tree; no error when it does not exist."""
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    elif _p(path).exists():
        _p(path).rmtree()


def rename(src, dst) -> None:
    """Moves a folder (on an object store, which cannot rename one: copied, then the source removed)."""
    if is_local(src) and is_local(dst):
        os.replace(src, dst)
        return
    copy_tree(src, dst)
    rmtree(src)


def copy_tree(src, dst) -> None:
    """Copies the files under the folder ``src`` to ``dst`` (same relative names); either side may be a URL."""
    makedirs(dst)
    for name in listdir(src):
        s, d = join(src, name), join(dst, name)
        if isdir(s):
            copy_tree(s, d)
        else:
            copy_file(s, d)


def open(path, mode: str = "r"):  # noqa: A001 - the layer's open
    """``open`` for local paths; the URL's object for others (modes r, w, a, with or without b)."""
    if is_local(path):
        return builtins.open(path, mode)
    return _p(path).open(mode)


def copy_file(src, dst) -> None:
    """Copies one file; either side may be local or a URL."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 22)


def upload_tree(local_dir: str, dst) -> None:
    """Copies the files under a local folder to ``dst`` (same relative names)."""
    for root, _, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        target = dst if rel == "." else join(dst, *rel.split(os.sep))
        makedirs(target)
        for f in files:
            copy_file(os.path.join(root, f), join(target, f))


def download_tree(src, local_dir: str, skip: Sequence[str] = ()) -> None:
    """Copies the files under ``src`` into a local folder, leaving out the top-level names in ``skip``."""
    os.makedirs(local_dir, exist_ok=True)
    for name in listdir(src):
        if name not in skip:
            (copy_tree if isdir(join(src, name)) else copy_file)(join(src, name), os.path.join(local_dir, name))


@contextlib.contextmanager
def local_copy(path, skip: Sequence[str] = ()) -> Iterator[str]:
    """``path`` itself when local; otherwise a temporary local copy of the folder (without the
    top-level names in ``skip``), removed afterwards. For readers that need real files (torch, tokenizers)."""
    if is_local(path):
        yield os.fspath(path)
        return
    tmp = tempfile.mkdtemp(prefix="vita_jax-")
    try:
        download_tree(path, tmp, skip)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Staged:
    """A local folder standing in for ``remote`` (a URL): :meth:`sync` uploads its files (whole, every
    ``every_s`` seconds unless ``force``); :meth:`close` uploads and removes the local folder.
    A local ``remote`` is used directly (``.local`` is ``remote``; sync and close do nothing)."""

    def __init__(self, remote, every_s: float = SYNC_SECONDS):
        self.remote, self.every_s, self._last = os.fspath(remote), every_s, time.monotonic()
        self.local = self.remote if is_local(self.remote) else tempfile.mkdtemp(prefix="vita_jax-staged-")

    def due(self) -> bool:
        """Whether a :meth:`sync` now would upload (a URL target, ``every_s`` passed since the last)."""
        return self.local != self.remote and time.monotonic() - self._last >= self.every_s

    def sync(self, force: bool = False) -> None:
        if self.local == self.remote or not (force or self.due()):
            return
        upload_tree(self.local, self.remote)
        self._last = time.monotonic()

    def close(self) -> None:
        if self.local != self.remote:
            self.sync(force=True)
            shutil.rmtree(self.local, ignore_errors=True)


class _StagedAppend:
    """Append-only text file for a URL: a local copy (seeded with what is there) takes the writes;
    flush uploads it whole at most every ``every_s`` seconds, close always."""

    def __init__(self, path: str, every_s: float):
        self.path, self.every_s, self._last = path, every_s, time.monotonic()
        self._dir = tempfile.mkdtemp(prefix="vita_jax-staged-")
        self._local = os.path.join(self._dir, posixpath.basename(path))
        if exists(path):
            copy_file(path, self._local)
        self._f = builtins.open(self._local, "a")

    def write(self, s: str) -> int:
        return self._f.write(s)

    def writelines(self, lines) -> None:
        self._f.writelines(lines)

    def flush(self) -> None:
        self._f.flush()
        if time.monotonic() - self._last >= self.every_s:
            self._upload()

    def _upload(self) -> None:
        copy_file(self._local, self.path)
        self._last = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
            self._upload()
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def appender(path, every_s: float = SYNC_SECONDS):
    """An append-only text file: ``open(path, "a")`` for a local path; for a URL a local copy uploaded
    on flush (at most every ``every_s`` seconds) and at close, since object stores cannot append."""
    return builtins.open(path, "a") if is_local(path) else _StagedAppend(os.fspath(path), every_s)
