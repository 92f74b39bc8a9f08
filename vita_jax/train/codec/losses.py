"""TiCodec training losses and the mel front-end as upstream ``meldataset.mel_spectrogram`` computes it.

Mel: reflect-pad ``(n_fft − hop) // 2`` both sides, ``stft(center=False)`` with the periodic Hann
window, magnitude ``sqrt(re² + im² + 1e-9)``, librosa's Slaney mel filterbank (float32; ``fmax``
None -> sr/2; small FFTs have all-zero filters, kept), ``log(clamp(x, 1e-5))``.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax.numpy as jnp
import numpy as np

from vita_jax.models.discriminators import hann_window, stft_frames


@functools.lru_cache(maxsize=None)
def mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: Optional[float]) -> np.ndarray:
    """``librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax)`` (Slaney scale and norm), float32
    ``[n_mels, n_fft/2+1]``."""
    import librosa  # slow import; only the codec's mel front-end needs it
    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax).astype(np.float32)


def mel_spectrogram(y, n_fft: int, num_mels: int, sampling_rate: int, hop_size: int, win_size: int,
                    fmin: float, fmax: Optional[float]):
    """``y [B, L]`` (float32, −1..1) -> log mel ``[B, num_mels, (L + 2·pad − n_fft) // hop + 1]``."""
    if win_size != n_fft:
        raise ValueError(f"win_size {win_size} != n_fft {n_fft}: only full-length windows are supported")
    pad = (n_fft - hop_size) // 2
    y = jnp.pad(y, ((0, 0), (pad, pad)), mode="reflect")
    spec = stft_frames(y, n_fft, hop_size, jnp.asarray(hann_window(win_size)))     # [B, frames, freq]
    mag = jnp.sqrt(jnp.square(spec.real) + jnp.square(spec.imag) + 1e-9)
    mel = jnp.einsum("mf,btf->bmt", jnp.asarray(mel_filters(sampling_rate, n_fft, num_mels, fmin, fmax)), mag)
    return jnp.log(jnp.maximum(mel, 1e-5))


def discriminator_loss(real, fake):
    """LSGAN: ``Σ_d mean((1 − D(y))²) + mean(D(ŷ)²)``; also the per-sub-discriminator terms."""
    r = [jnp.mean(jnp.square(1.0 - d)) for d in real]
    g = [jnp.mean(jnp.square(d)) for d in fake]
    return sum(a + b for a, b in zip(r, g)), jnp.stack(r), jnp.stack(g)


def generator_loss(fake):
    """``Σ_d mean((1 − D(ŷ))²)`` and the per-sub-discriminator terms."""
    terms = [jnp.mean(jnp.square(1.0 - d)) for d in fake]
    return sum(terms), jnp.stack(terms)


def feature_loss(fmap_r, fmap_g):
    """``2 · Σ_{d, layer} mean|f(y) − f(ŷ)|`` (each layer weighted equally); also the per-layer means."""
    means = [[jnp.mean(jnp.abs(r - g)) for r, g in zip(dr, dg)] for dr, dg in zip(fmap_r, fmap_g)]
    return 2.0 * sum(sum(m) for m in means), jnp.stack([jnp.stack(m) for m in means])


def l1(a, b):
    return jnp.mean(jnp.abs(a - b))
