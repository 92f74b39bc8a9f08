"""Stage 3.1 training data as upstream TiCodec's ``MelDataset`` (training mode) produces it.

``random.seed(1234)`` + one ``random.shuffle`` of the file list (the order of every epoch), then the
crop draws start from a fresh seed-1234 stream (upstream builds the validation set right after,
which reseeds the global ``random``). Per file: if at least ``segment_size`` long, crop 1 at
``randint(0, len − segment)`` and an independent crop 2 (the global branch's input); else both are
the file zero-padded at the end, with no draw. Batches in list order, the last incomplete one dropped.
The main mel target (``fmax_for_loss``) is computed in the step from crop 1 (same function).
"""
from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import soundfile as sf


def file_list_lines(path: str, root: Optional[str] = None) -> list:
    """``(wav path, line number)`` of each entry of a ``train.lst``-style list (one wav path a line, relative
    to ``root`` or the list's folder); a list that is not UTF-8 text or a line without a path is named."""
    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a wav list (not UTF-8 text: {e.reason} at byte {e.start})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            name = line.strip().split("|")[0].strip()
            if not name:
                raise ValueError(f"{path} line {n}: no wav path before '|'")
            out.append((os.path.join(root, name), n))
    return out


def read_file_list(path: str, root: Optional[str] = None) -> list:
    """A ``train.lst``-style list (one wav path a line, relative to ``root`` or the list's folder)."""
    return [p for p, _ in file_list_lines(path, root)]


def wav_folder(folder: str) -> list:
    """Every ``.wav`` below ``folder``, sorted."""
    out = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(".wav")]
    if not out:
        raise ValueError(f"{folder}: no .wav files")
    return sorted(out)


def load_wav(path: str, sampling_rate: int) -> np.ndarray:
    """Float32 mono samples as ``librosa.load(path, sr)`` gives them for a file already at ``sr``."""
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    if sr != sampling_rate:
        raise ValueError(f"{path}: sample rate {sr}, the codec config wants {sampling_rate}")
    return x.mean(axis=1).astype(np.float32) if x.shape[1] > 1 else x[:, 0]


class CodecData:
    """Iterator of host batches ``{"y", "y_global": [B, segment], "samples": [B]}`` (real samples of a row)
    with ``get_state`` / ``set_state`` (epoch, batch index and the crop RNG) for exact resume."""

    def __init__(self, files: list, segment_size: int, batch_size: int, sampling_rate: int, seed: int = 1234,
                 lengths: Optional[dict] = None):
        """``lengths``: ``{path: samples}`` from the headers; with it only the crops are read (no cache), as
        a real-size corpus needs; without it every file is read whole once and kept."""
        if len(files) < batch_size:
            raise ValueError(f"{len(files)} training file(s) for batch_size {batch_size}: not one full batch")
        rng = random.Random(seed)
        self.files = list(files)
        rng.shuffle(self.files)
        self.rng = random.Random(seed)  # the validation set's reseed: the crop draws start afresh
        self.segment, self.batch, self.sr = segment_size, batch_size, sampling_rate
        self.epoch, self.index = 0, 0
        self.draws: list = []
        self._cache: dict = {}
        self.lengths = lengths

    @property
    def steps_per_epoch(self) -> int:
        return len(self.files) // self.batch

    def _wav(self, path):
        if path not in self._cache:
            self._cache[path] = load_wav(path, self.sr)
        return self._cache[path]

    def _read(self, path, start, n):
        if self.lengths is None:
            return self._wav(path)[start:start + n]
        x, _ = sf.read(path, start=start, frames=n, dtype="float32", always_2d=True)
        return x.mean(axis=1).astype(np.float32) if x.shape[1] > 1 else x[:, 0]

    def crops(self, path):
        """``(crop 1, crop 2, real samples)`` of one file."""
        n = self.lengths[path] if self.lengths is not None else len(self._wav(path))
        if n >= self.segment:
            a = self.rng.randint(0, n - self.segment)
            b = self.rng.randint(0, n - self.segment)
            self.draws += [(0, n - self.segment, a), (0, n - self.segment, b)]
            return self._read(path, a, self.segment), self._read(path, b, self.segment), self.segment
        pad = np.pad(self._read(path, 0, n), (0, self.segment - n))
        return pad, pad, n

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        names = self.files[self.index * self.batch:(self.index + 1) * self.batch]
        y, yg, real = zip(*[self.crops(p) for p in names])
        self.index += 1
        return {"y": np.stack(y), "y_global": np.stack(yg), "samples": np.asarray(real, np.int32)}

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "rng": self.rng.getstate()}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        rng = state["rng"]  # a JSON round trip makes lists of random's tuples
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]) if isinstance(rng, list) else rng)
