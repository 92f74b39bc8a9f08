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


def read_file_list(path: str, root: Optional[str] = None) -> list:
    """A ``train.lst``-style list (one wav path a line, relative to ``root`` or the list's folder)."""
    root = root if root is not None else os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        return [os.path.join(root, line.strip().split("|")[0]) for line in f if line.strip()]


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
    """Iterator of host batches ``{"y", "y_global": [B, segment]}`` with ``get_state`` / ``set_state``
    (epoch, batch index and the crop RNG) for exact resume."""

    def __init__(self, files: list, segment_size: int, batch_size: int, sampling_rate: int, seed: int = 1234):
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

    @property
    def steps_per_epoch(self) -> int:
        return len(self.files) // self.batch

    def _wav(self, path):
        if path not in self._cache:
            self._cache[path] = load_wav(path, self.sr)
        return self._cache[path]

    def crops(self, path):
        x = self._wav(path)
        if len(x) >= self.segment:
            a = self.rng.randint(0, len(x) - self.segment)
            b = self.rng.randint(0, len(x) - self.segment)
            self.draws += [(0, len(x) - self.segment, a), (0, len(x) - self.segment, b)]
            return x[a:a + self.segment], x[b:b + self.segment]
        pad = np.pad(x, (0, self.segment - len(x)))
        return pad, pad

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        names = self.files[self.index * self.batch:(self.index + 1) * self.batch]
        y, yg = zip(*[self.crops(p) for p in names])
        self.index += 1
        return {"y": np.stack(y), "y_global": np.stack(yg)}

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "rng": self.rng.getstate()}

    def set_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.rng.setstate(state["rng"])
