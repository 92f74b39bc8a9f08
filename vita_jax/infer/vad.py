"""Silero VAD (v5/v6, 16 kHz) in numpy, and the streaming speech segmenter of the live server.

The weights are the initializers of ``silero_vad_16k_op15.onnx``, the 16 kHz model that the
``silero-vad`` wheel ships (no download, no torch: the file is found with
``importlib.util.find_spec``, which does not run the package's ``__init__`` (that imports torch),
and read with the ``onnx`` package). They are bitwise the tensors of the wheel's TorchScript model
(``silero_vad.jit``); the wheel's ``silero_vad_16k.safetensors`` is *not* used: it holds other
weights (conv1 differs by up to 4.0 from the TorchScript model's). The network (the wheel's
``tinygrad_model.py`` spells it out): 512 new samples + 64 samples of context,
reflect-padded by 64 -> a 256-point STFT as a convolution (stride 128, 4 frames, 129 magnitudes)
-> 4 conv+ReLU (strides 1, 2, 2, 1; 128 -> 64 -> 64 -> 128 channels) -> an LSTM cell (128) ->
ReLU -> 1x1 conv -> sigmoid -> the speech probability of the 32 ms window.

:class:`Segmenter` is the official demo's streaming rule (as the wheel's ``VADIterator``): speech
starts when a window's probability reaches ``start`` (0.7), ends once it has stayed below ``end``
(0.55) for ``min_silence_ms`` (500 ms); a segment shorter than ``min_speech_ms`` (1 s) is not a
question. All settings are fields of :class:`VADConfig`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Optional

import numpy as np

RATE = 16000
WINDOW = 512     # samples per VAD window (32 ms), fixed by the 16 kHz model
CONTEXT = 64     # samples of the previous window the model sees again
WEIGHTS = "silero_vad_16k_op15.onnx"
# our name <- the initializer's name in the ONNX file (= the TorchScript state dict's, prefixed by "model.")
NAMES = {"stft_conv.weight": "stft.forward_basis_buffer", "lstm_cell.weight_ih": "decoder.rnn.weight_ih",
         "lstm_cell.weight_hh": "decoder.rnn.weight_hh", "lstm_cell.bias_ih": "decoder.rnn.bias_ih",
         "lstm_cell.bias_hh": "decoder.rnn.bias_hh", "final_conv.weight": "decoder.decoder.2.weight",
         "final_conv.bias": "decoder.decoder.2.bias",
         **{f"conv{i + 1}.{k}": f"encoder.{i}.reparam_conv.{k}" for i in range(4) for k in ("weight", "bias")}}


def weights_path() -> str:
    """The wheel's safetensors file; ``OSError`` naming the fix when the wheel is not installed."""
    # locates the package without importing it (its __init__ imports torch)
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Silero VAD weights: the silero-vad wheel is not installed "
                                "(pip install 'vita_jax[serve]' or pip install silero-vad)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing from the installed silero-vad wheel (5.1+ ships it)")
    return path


def load_weights(path: Optional[str] = None) -> dict:
    """``{name: float32 array}`` (names of :data:`NAMES`: ``stft_conv.weight [258, 1, 256]`` ...) from
    the wheel's ONNX file (or ``path``); ``ValueError`` naming the file when a tensor is missing."""
    import onnx  # the serve extra; only the live server needs it
    from onnx import numpy_helper  # (as above)
    path = path or weights_path()
    inits = {i.name: i for i in onnx.load(path, load_external_data=False).graph.initializer}
    missing = [f"model.{v}" for v in NAMES.values() if f"model.{v}" not in inits]
    if missing:
        raise ValueError(f"{path}: not a Silero VAD 16 kHz model, initializers missing: {missing}")
    return {k: np.asarray(numpy_helper.to_array(inits[f"model.{v}"]), np.float32) for k, v in NAMES.items()}


def _conv1d(x, w2, b, k: int, stride: int):
    """``x [C_in, T]`` (already padded), ``w2 [C_out, C_in·K]`` (the weight ``[C_out, C_in, K]``
    flattened) -> ``[C_out, T_out]``."""
    cols = np.lib.stride_tricks.sliding_window_view(x, k, axis=1)[:, ::stride]   # [C_in, T_out, K]
    return w2 @ cols.transpose(0, 2, 1).reshape(w2.shape[1], -1) + b[:, None]


class SileroVAD:
    """The speech probability of each 512-sample window of one stream (state carried between calls).

    ``w = SileroVAD(); p = w(window)`` with ``window`` float32 ``[512]`` in [-1, 1]; ``reset()``
    starts a new stream. Per window about 0.5 ms of numpy on one core (1.6 % of real time)."""

    def __init__(self, weights: Optional[dict] = None):
        w = load_weights() if weights is None else weights
        self.w = w
        stft = w["stft_conv.weight"][:, 0, :]                      # [258, 256]: real rows then imaginary rows
        self._stft = stft
        self._convs = [(w[f"conv{i}.weight"].reshape(w[f"conv{i}.weight"].shape[0], -1), w[f"conv{i}.bias"],
                        w[f"conv{i}.weight"].shape[2], s) for i, s in ((1, 1), (2, 2), (3, 2), (4, 1))]
        self._w_ih, self._w_hh = w["lstm_cell.weight_ih"], w["lstm_cell.weight_hh"]
        self._b = w["lstm_cell.bias_ih"] + w["lstm_cell.bias_hh"]
        self._out_w, self._out_b = w["final_conv.weight"][0, :, 0], float(w["final_conv.bias"][0])
        self.reset()

    def reset(self) -> None:
        self.h = np.zeros(128, np.float32)
        self.c = np.zeros(128, np.float32)
        self.context = np.zeros(CONTEXT, np.float32)

    def __call__(self, window) -> float:
        x = np.asarray(window, np.float32).reshape(-1)
        if x.shape[0] != WINDOW:
            raise ValueError(f"Silero VAD takes windows of {WINDOW} samples at 16 kHz, got {x.shape[0]}")
        full = np.concatenate([self.context, x])                   # [576]
        self.context = x[-CONTEXT:].copy()
        full = np.pad(full, (0, 64), mode="reflect")               # [640]
        frames = np.lib.stride_tricks.sliding_window_view(full, 256)[::128]   # [4, 256]
        spec = self._stft @ frames.T                               # [258, 4]
        h = np.sqrt(spec[:129] ** 2 + spec[129:] ** 2)
        for w2, b, k, s in self._convs:
            z = np.zeros((h.shape[0], 1), np.float32)
            h = np.maximum(_conv1d(np.concatenate([z, h, z], axis=1), w2, b, k, s), 0.0)
        x = h[:, 0]                                                # [128] (one frame left)
        g = self._w_ih @ x + self._w_hh @ self.h + self._b         # gates i, f, g, o (torch order)
        i, f, gg, o = (g[k * 128:(k + 1) * 128] for k in range(4))
        sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731 (local shorthand)
        self.c = sig(f) * self.c + sig(i) * np.tanh(gg)
        self.h = (sig(o) * np.tanh(self.c)).astype(np.float32)
        self.c = self.c.astype(np.float32)
        logit = float(self._out_w @ np.maximum(self.h, 0.0)) + self._out_b
        return float(1.0 / (1.0 + np.exp(-logit)))

    def probs(self, wave) -> np.ndarray:
        """A whole float waveform (zero-padded to whole windows) -> probabilities ``[windows]``; resets first."""
        self.reset()
        x = np.asarray(wave, np.float32).reshape(-1)
        x = np.pad(x, (0, -len(x) % WINDOW))
        return np.asarray([self(x[i:i + WINDOW]) for i in range(0, len(x), WINDOW)], np.float32)


@dataclasses.dataclass(frozen=True)
class VADConfig:
    """Streaming settings (the official demo's): ``start`` probability to enter speech, ``end``
    probability to count as silence, ``min_silence_ms`` of silence that ends a segment,
    ``min_speech_ms`` below which a segment is not a question, ``pad_ms`` kept before the start."""
    start: float = 0.7
    end: float = 0.55
    min_silence_ms: int = 500
    min_speech_ms: int = 1000
    pad_ms: int = 30
    max_speech_s: float = 30.0   # a segment is closed (as speech_end) at this length

    def __post_init__(self):
        if not (0.0 < self.end <= self.start < 1.0):
            raise ValueError(f"VAD thresholds: need 0 < end ({self.end}) <= start ({self.start}) < 1")
        if min(self.min_silence_ms, self.min_speech_ms, self.pad_ms) < 0 or self.max_speech_s <= 0:
            raise ValueError("VAD durations must be >= 0 (max_speech_s > 0)")


class Segmenter:
    """Feeds 16 kHz float samples of any length through the VAD window by window and returns the
    events they complete: ``("speech_start", None, at)`` and ``("speech_end", segment float32 or
    None, at)`` (None: shorter than ``min_speech_ms``, not a question; ``at``: the stream sample
    just after the window that decided it). The decisions are the wheel's
    ``VADIterator(threshold=start, min_silence_duration_ms=min_silence_ms, speech_pad_ms=pad_ms)``
    with its end threshold ``end`` instead of ``start - 0.15`` (the same for the defaults): a
    window at or above ``start`` clears the pending end; the silence is counted from the first
    window below ``end``. The segment runs from ``pad_ms`` before the start window to ``pad_ms``
    after the start of that first silent window. ``in_speech`` tells the state."""

    def __init__(self, config: VADConfig = VADConfig(), weights: Optional[dict] = None,
                 vad: Optional[SileroVAD] = None):
        self.cfg = config
        self.vad = vad if vad is not None else SileroVAD(weights)
        self.reset()

    def reset(self) -> None:
        self.vad.reset()
        self.pending = np.zeros(0, np.float32)
        self.pre = np.zeros(0, np.float32)      # the last pad_ms before a start
        self.segment: list = []
        self.in_speech = False
        self.current = 0                        # samples seen (whole windows)
        self.seg_start = 0                      # stream sample where the segment buffer starts
        self.temp_end = 0                       # stream sample after the first silent window (0: none)
        self.last_prob = 0.0

    def feed(self, samples) -> list:
        c = self.cfg
        x = np.concatenate([self.pending, np.asarray(samples, np.float32).reshape(-1)])
        n = len(x) - len(x) % WINDOW
        self.pending = x[n:]
        events, pad = [], int(c.pad_ms * RATE / 1000)
        for i in range(0, n, WINDOW):
            w = x[i:i + WINDOW]
            self.current += WINDOW
            p = self.last_prob = self.vad(w)
            if p >= c.start:
                self.temp_end = 0
            if not self.in_speech:
                if p >= c.start:
                    self.in_speech = True
                    self.segment = [self.pre, w]
                    self.seg_start = self.current - WINDOW - len(self.pre)
                    events.append(("speech_start", None, self.current))
                else:
                    self.pre = np.concatenate([self.pre, w])[-pad:] if pad else self.pre[:0]
                continue
            self.segment.append(w)
            if p < c.end and not self.temp_end:
                self.temp_end = self.current
            if self.temp_end and self.current - self.temp_end >= c.min_silence_ms * RATE / 1000:
                events.append(("speech_end", self._close(self.temp_end - WINDOW + pad), self.current))
            elif self.current - self.seg_start >= c.max_speech_s * RATE:
                events.append(("speech_end", self._close(self.current), self.current))
        return events

    def _close(self, end: int) -> Optional[np.ndarray]:
        """Ends the segment at stream sample ``end``; the segment, or None when it is too short."""
        seg = np.concatenate(self.segment)[:max(0, end - self.seg_start)]
        self.in_speech, self.segment, self.temp_end = False, [], 0
        self.pre = np.zeros(0, np.float32)
        return seg if 1000 * len(seg) / RATE >= self.cfg.min_speech_ms else None
