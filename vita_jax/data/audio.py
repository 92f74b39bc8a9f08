"""Speech features as the official VITA-1.5 processor computes them (host side, numpy).

Kaldi fbank (``torchaudio.compliance.kaldi.fbank`` semantics) of the 16 kHz waveform scaled by
2^15: 25 ms Povey windows every 10 ms (snip edges), DC removal, pre-emphasis 0.97, 512-point power
spectrum, 80 triangular mel bins over 20 Hz..8 kHz, log with a float32-epsilon floor, energy floor
0, dither configurable (0 at evaluation). Computed in float64 (official float32 differs from
float64 by < 1e-4 max, 1e-6 mean). Audio I/O and resampling use soundfile / librosa; stereo is
averaged to mono. Global CMVN statistics come from the official ``global_cmvn`` JSON.
"""
from __future__ import annotations

import functools
import os
from typing import IO, Optional, Union

import numpy as np
import soundfile as sf

from vita_jax.models.whale import encoder_length, llm_length  # noqa: F401  (re-exported: frames -> LLM tokens)
from vita_jax.sizes import ceil_div

SAMPLE_RATE = 16000
FRAME_LENGTH = 400   # 25 ms
FRAME_SHIFT = 160    # 10 ms
N_FFT = 512
EPS = float(np.finfo(np.float32).eps)
MIN_FRAMES = 7       # the shortest fbank input of the speech encoder (encoder_length(7) == 1: one LLM token)


class AudioError(ValueError):
    """Audio that cannot be used; the message names the file when there is one."""


def num_frames(n_samples: int) -> int:
    """Kaldi frames with snip edges: ``1 + (n - 400) // 160`` (0 below one window)."""
    return 0 if n_samples < FRAME_LENGTH else 1 + (n_samples - FRAME_LENGTH) // FRAME_SHIFT


@functools.lru_cache(maxsize=None)
def mel_banks(num_bins: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
              low_freq: float = 20.0, high_freq: float = 0.0) -> np.ndarray:
    """Kaldi triangular mel filters ``[num_bins, n_fft // 2 + 1]`` (last column zero, as Kaldi).

    Evaluated in float32 step by step like torchaudio's ``get_mel_banks`` (its float32 rounding of
    mel values near 2800 moves the filter edges by ~1e-5, which is visible in the log energies)."""
    f32 = np.float32
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist

    def mel_scalar(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    mel_low, mel_high = mel_scalar(low_freq), mel_scalar(high_freq)
    delta = f32((mel_high - mel_low) / (num_bins + 1))
    b = np.arange(num_bins, dtype=f32)[:, None]
    left = f32(mel_low) + b * delta
    center = f32(mel_low) + (b + f32(1.0)) * delta
    right = f32(mel_low) + (b + f32(2.0)) * delta
    freqs = f32(sample_rate / n_fft) * np.arange(n_fft // 2, dtype=f32)
    m = (f32(1127.0) * np.log(f32(1.0) + freqs / f32(700.0)))[None, :]
    up = (m - left) / (center - left)
    down = (right - m) / (right - center)
    banks = np.maximum(f32(0.0), np.minimum(up, down))
    return np.pad(banks, ((0, 0), (0, 1))).astype(np.float64)


@functools.lru_cache(maxsize=None)
def povey_window(length: int = FRAME_LENGTH) -> np.ndarray:
    n = np.arange(length, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2 * np.pi * n / (length - 1))) ** 0.85


def fbank(waveform, num_mel_bins: int = 80, dither: float = 0.0, energy_floor: float = 0.0,
          rng: Optional[np.random.Generator] = None, name: str = "<waveform>") -> np.ndarray:
    """Kaldi fbank of a 16 kHz mono waveform **already scaled to int16 range** -> float32
    ``[frames, num_mel_bins]`` (log mel energies)."""
    x = np.asarray(waveform, np.float64).reshape(-1)
    if x.size == 0:
        raise AudioError(f"{name}: empty audio (no samples)")
    if not np.isfinite(x).all():
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    n = num_frames(x.size)
    if n == 0:
        raise AudioError(f"{name}: {x.size} samples is shorter than one 25 ms frame ({FRAME_LENGTH} samples at 16 kHz)")
    idx = np.arange(FRAME_LENGTH)[None, :] + FRAME_SHIFT * np.arange(n)[:, None]
    frames = x[idx]
    if dither != 0.0:
        rng = rng or np.random.default_rng()
        frames = frames + dither * rng.standard_normal(frames.shape)
    frames = frames - frames.mean(axis=1, keepdims=True)
    prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = (frames - 0.97 * prev) * povey_window()
    spec = np.abs(np.fft.rfft(frames, n=N_FFT, axis=1)) ** 2
    mel = spec @ mel_banks(num_mel_bins).T
    out = np.log(np.maximum(mel, EPS))
    if energy_floor > 0.0:  # only used with use_energy in Kaldi; kept for completeness of the API
        out = np.maximum(out, np.log(energy_floor))
    return out.astype(np.float32)


def to_int16_range(waveform) -> np.ndarray:
    """float in [-1, 1] -> ×32768 (as the official processor); int16 -> its integer values."""
    w = np.asarray(waveform)
    if w.dtype == np.int16:
        return w.astype(np.float64)
    if not np.issubdtype(w.dtype, np.floating):
        raise AudioError(f"waveform dtype {w.dtype}: expected float in [-1, 1] or int16")
    return w.astype(np.float64) * 32768.0


def prepare_waveform(waveform, sample_rate: int, name: str = "<waveform>") -> np.ndarray:
    """Any rate, mono ``[n]`` or multi-channel (``[n, ch]`` as soundfile, or ``[ch, n]``) ->
    float64 16 kHz mono in int16 range."""
    w = np.asarray(waveform)
    if w.size == 0:
        raise AudioError(f"{name}: empty audio (no samples)")
    if w.ndim == 2:
        ch_axis = 1 if w.shape[1] <= 8 and w.shape[0] > w.shape[1] else 0
        w = w.astype(np.float64).mean(axis=ch_axis) if w.dtype != np.int16 else \
            np.round(w.astype(np.float64).mean(axis=ch_axis)).astype(np.int16)
    elif w.ndim != 1:
        raise AudioError(f"{name}: waveform must be 1-D or [samples, channels], got shape {w.shape}")
    x = to_int16_range(w)
    if not np.isfinite(x).all():
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    if sample_rate != SAMPLE_RATE:
        import librosa  # slow import (~1-2 s, numba): only when resampling
        x = librosa.resample(x / 32768.0, orig_sr=sample_rate, target_sr=SAMPLE_RATE) * 32768.0
    return x


def _name(src) -> str:
    """A path's name, or a file object's ``name`` (``io.BytesIO`` has none unless one is set)."""
    return str(getattr(src, "name", "<audio bytes>")) if hasattr(src, "read") else os.fspath(src)


def fbank_frames_for(n_samples: int, sample_rate: int) -> int:
    """fbank frames of ``n_samples`` at ``sample_rate`` once resampled to 16 kHz (the resampler's
    output length ``ceil(n * 16000 / rate)``)."""
    return num_frames(ceil_div(int(n_samples) * SAMPLE_RATE, int(sample_rate)))


def check_length(n_samples: int, sample_rate: int, max_frames: Optional[int], name: str, min_frames: int = 0) -> None:
    """:class:`AudioError` naming the file and both lengths when the clip has no samples, is under
    ``min_frames`` fbank frames (the speech encoder's :data:`MIN_FRAMES`) or over ``max_frames`` (None
    or 0: no limit; the speech encoder's is ``WhaleConfig.max_frames``, from ``config.audio.max_positions``)."""
    if n_samples <= 0:
        raise AudioError(f"{name}: empty audio (0 samples)")
    frames = fbank_frames_for(n_samples, sample_rate)
    if frames < min_frames:
        raise AudioError(f"{name}: {n_samples / sample_rate * 1000:.0f} ms of audio ({frames} fbank frames) is shorter "
                         f"than the speech encoder's shortest input of {min_frames} frames (85 ms)")
    if max_frames and frames > max_frames:
        raise AudioError(f"{name}: {n_samples / sample_rate:.1f} s of audio ({frames} fbank frames) is longer than the "
                         f"speech encoder's limit of {max_frames} frames ({max_frames / 100:.1f} s: 4 x "
                         f"config.audio.max_positions + 3); cut the clip")


def _open_error(name: str, e: Exception) -> AudioError:
    """libsndfile's open errors, reworded: it says "File does not exist" for data it cannot parse
    (a corrupt MP3) and "System error" for a missing file."""
    msg = " ".join(str(e).split())
    msg = msg.split(": ", 1)[1] if msg.startswith("Error opening") and ": " in msg else msg
    if "does not exist" in msg or "System error" in msg or "not recognised" in msg.lower():
        msg = "not a recognised audio format, or the data is corrupt"
    return AudioError(f"{name}: cannot read audio: {msg}")


def probe_audio(path: Union[str, os.PathLike, IO[bytes]], max_frames: Optional[int] = None,
                min_frames: int = 0) -> tuple[int, int]:
    """The file's header only (nothing decoded) -> ``(samples per channel, sample_rate)``;
    :class:`AudioError` (one line, naming the file) when it is missing, empty, not audio, has no
    samples or is longer than ``max_frames`` fbank frames."""
    name, is_file = _name(path), hasattr(path, "read")
    if not is_file:
        if not os.path.exists(name):
            raise AudioError(f"{name}: no such audio file" + (" (a broken symlink or a symlink loop)"
                                                               if os.path.islink(name) else ""))
        if os.path.isdir(name):
            raise AudioError(f"{name}: is a folder, not an audio file")
        if os.path.getsize(name) == 0:
            raise AudioError(f"{name}: empty file (0 bytes), not audio")
    start = path.tell() if is_file else 0
    try:
        info = sf.info(path if is_file else name)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError for unreadable files
        raise _open_error(name, e) from e
    finally:
        if is_file:
            path.seek(start)
    check_length(int(info.frames), int(info.samplerate), max_frames, name, min_frames)
    return int(info.frames), int(info.samplerate)


def load_audio(path: Union[str, os.PathLike, IO[bytes]], max_frames: Optional[int] = None,
               min_frames: int = 0) -> tuple[np.ndarray, int]:
    """Reads an audio file (a path, or a binary file object such as ``io.BytesIO`` of the file's
    bytes, named in errors by its ``name`` if set) -> ``(samples [n] or [n, ch] float32 in [-1, 1],
    sample_rate)``. The header is checked first (:func:`probe_audio`: a clip over ``max_frames``
    fbank frames is refused without being decoded)."""
    name = _name(path)
    probe_audio(path, max_frames, min_frames)
    try:
        data, sr = sf.read(path if hasattr(path, "read") else name, dtype="float32", always_2d=False)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError for unreadable files
        raise _open_error(name, e) from e
    if len(data) == 0:
        raise AudioError(f"{name}: empty audio (0 samples decoded)")
    return data, int(sr)


def audio_features(waveform_or_path, sample_rate: Optional[int] = None, dither: float = 0.0,
                   num_mel_bins: int = 80, max_frames: Optional[int] = None, min_frames: int = 0) -> np.ndarray:
    """A path, a binary file object (``io.BytesIO`` of an audio file), or a waveform (float in
    [-1, 1] or int16) with its rate -> float32 fbank ``[frames, 80]`` before CMVN. A clip over
    ``max_frames`` fbank frames (None: no limit) is refused before it is decoded or resampled."""
    name = "<waveform>"
    if isinstance(waveform_or_path, (str, os.PathLike)) or hasattr(waveform_or_path, "read"):
        name = _name(waveform_or_path)
        waveform_or_path, sample_rate = load_audio(waveform_or_path, max_frames, min_frames)
    elif sample_rate is None:
        raise AudioError("sample_rate is required with a waveform")
    elif isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)) or \
            not 0 < sample_rate < float("inf"):
        raise AudioError(f"{name}: sample_rate {sample_rate!r}: must be a positive number of samples per second")
    elif (max_frames or min_frames) and np.size(waveform_or_path) and np.ndim(waveform_or_path) in (1, 2):
        # samples: the longer axis
        check_length(max(np.shape(waveform_or_path)), sample_rate, max_frames, name, min_frames)
    x = prepare_waveform(waveform_or_path, sample_rate, name)
    return fbank(x, num_mel_bins, dither=dither, name=name)


def pad_batch(features: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pads fbank clips at the end like the official collator -> ``([clips, T, 80], lengths)``."""
    lengths = np.asarray([f.shape[0] for f in features], np.int32)
    out = np.zeros((len(features), int(lengths.max()), features[0].shape[1]), np.float32)
    for i, f in enumerate(features):
        out[i, :f.shape[0]] = f
    return out, lengths
