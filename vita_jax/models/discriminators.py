"""The three discriminators of TiCodec training (HiFi-GAN's multi-period and multi-scale ones, EnCodec's
multi-scale STFT one), in PyTorch layout with official names (layers of :mod:`vita_jax.models.codec_layers`).

Each family returns ``(logits, fmaps)``: a list per sub-discriminator of its output (MPD / MSD
flattened to ``[B, n]``, MS-STFT ``[B, 1, frames, freq']``) and of its feature maps (MPD / MSD:
every conv after LeakyReLU and the conv_post output; MS-STFT: its 5 convs after LeakyReLU(0.2)).
MSD[0] is spectral-normed: with ``buffers`` mutable, one power iteration per call updates
``weight_u`` / ``weight_v`` (training); the weight used is ``weight_orig / σ`` with gradients
through σ only via ``weight_orig`` (u, v constants).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vita_jax.models.codec_layers import LRELU, PlainConv, WNConv, conv, leaky_relu

PERIODS = (2, 3, 5, 7, 11)
STFT_NFFTS = (1024, 2048, 512, 256, 128)  # hop n_fft/4, window n_fft (MultiScaleSTFTDiscriminator(32))


def _normalize(x, eps=1e-12):
    return x / jnp.maximum(jnp.linalg.norm(x), eps)


def power_iteration(wm, u):
    """One power iteration of ``torch.nn.utils.spectral_norm`` in training mode on ``wm [out, in/g·k]``
    (no gradient: torch runs it under ``no_grad`` and clones u, v): ``v = normalize(Wᵀu)``,
    ``u = normalize(W v)`` -> ``(u, v)``; σ = ``u · (W v)`` then keeps its gradient through W."""
    ws = jax.lax.stop_gradient(wm)
    v = _normalize(ws.T @ u)
    return _normalize(ws @ v), v


class SNConv1d(nn.Module):
    """Spectral-normed Conv1d (``weight_orig``, ``bias``; buffers ``weight_u [out]``, ``weight_v [in/g·k]``)."""
    out: int
    inp: int
    kernel: int
    stride: int = 1
    padding: int = 0
    groups: int = 1

    @nn.compact
    def __call__(self, x):
        fan_in = self.inp // self.groups * self.kernel
        bound = fan_in ** -0.5
        b = self.param("bias", lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound), (self.out,))
        w = self.param("weight_orig", lambda k, s: jax.random.uniform(k, s, jnp.float32, -bound, bound),
                       (self.out, self.inp // self.groups, self.kernel))
        u = self.variable("buffers", "weight_u", lambda: _normalize(jax.random.normal(self.make_rng("params"),
                                                                                      (self.out,))))
        v = self.variable("buffers", "weight_v", lambda: _normalize(jax.random.normal(self.make_rng("params"),
                                                                                      (fan_in,))))
        wm = w.reshape(self.out, -1)
        uu, vv = u.value, v.value
        if self.is_mutable_collection("buffers") and not self.is_initializing():
            uu, vv = power_iteration(wm, uu)
            u.value, v.value = uu, vv
        sigma = jnp.dot(uu, wm @ vv)
        self.sow("intermediates", "sigma", sigma)
        return conv(x, w / sigma, b, self.stride, self.padding, groups=self.groups)


class DiscriminatorP(nn.Module):
    period: int
    div: int = 1  # channel divisor (1: the official widths; tiny test / demo configs use more)

    @nn.compact
    def __call__(self, x):
        b, c, t = x.shape
        if t % self.period:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, self.period - t % self.period)), mode="reflect")
        x = x.reshape(b, c, -1, self.period)
        fmap = []
        chans = (1,) + tuple(c // self.div for c in (32, 128, 512, 1024, 1024))
        for j in range(5):
            x = WNConv(chans[j + 1], chans[j], (5, 1), stride=(3 if j < 4 else 1, 1), padding=(2, 0),
                       name=f"convs.{j}")(x)
            x = leaky_relu(x, LRELU)
            fmap.append(x)
        x = WNConv(1, chans[-1], (3, 1), padding=(1, 0), name="conv_post")(x)
        fmap.append(x)
        return x.reshape(b, -1), fmap


class MultiPeriodDiscriminator(nn.Module):
    div: int = 1

    @nn.compact
    def __call__(self, y):
        outs = [DiscriminatorP(p, self.div, name=f"discriminators.{i}")(y) for i, p in enumerate(PERIODS)]
        return [o[0] for o in outs], [o[1] for o in outs]


# (out, in, kernel, stride, groups, padding) of DiscriminatorS's convs
_S_CONVS = ((128, 1, 15, 1, 1, 7), (128, 128, 41, 2, 4, 20), (256, 128, 41, 2, 16, 20), (512, 256, 41, 4, 16, 20),
            (1024, 512, 41, 4, 16, 20), (1024, 1024, 41, 1, 16, 20), (1024, 1024, 5, 1, 1, 2))


class DiscriminatorS(nn.Module):
    spectral: bool = False
    div: int = 1

    @nn.compact
    def __call__(self, x):
        fmap = []
        d = self.div  # the group counts stay: every width divides by them for div <= 8
        convs = [(o // d, max(1, i // d), k, s, g, p) for o, i, k, s, g, p in _S_CONVS + ((1, 1024, 3, 1, 1, 1),)]
        convs[-1] = (1,) + convs[-1][1:]
        for j, (o, i, k, s, g, p) in enumerate(convs):
            name = f"convs.{j}" if j < len(_S_CONVS) else "conv_post"
            layer = SNConv1d(o, i, k, s, p, g, name=name) if self.spectral else \
                WNConv(o, i, (k,), stride=s, padding=p, groups=g, name=name)
            x = layer(x)
            if j < len(_S_CONVS):
                x = leaky_relu(x, LRELU)
            fmap.append(x)
        return x.reshape(x.shape[0], -1), fmap


def avg_pool(x):
    """``AvgPool1d(4, 2, padding=2)`` with ``count_include_pad=True`` on ``[B, C, T]``."""
    s = jax.lax.reduce_window(jnp.pad(x, ((0, 0), (0, 0), (2, 2))), 0.0, jax.lax.add, (1, 1, 4), (1, 1, 2), "VALID")
    return s / 4.0


class MultiScaleDiscriminator(nn.Module):
    """Called once per input (upstream calls real and fake alternately per scale; only MSD[0]'s
    power iterations depend on the order: call it on the real batch first, then the fake one)."""
    div: int = 1

    @nn.compact
    def __call__(self, y):
        logits, fmaps = [], []
        for i in range(3):
            if i:
                y = avg_pool(y)
            o, f = DiscriminatorS(spectral=(i == 0), div=self.div, name=f"discriminators.{i}")(y)
            logits.append(o)
            fmaps.append(f)
        return logits, fmaps


def hann_window(n: int) -> np.ndarray:
    """``torch.hann_window(n)`` (periodic), computed in float32 as torch does (equal to 1 ulp: its
    vectorised cos rounds differently)."""
    w = np.arange(n + 1, dtype=np.float32) * np.float32(2 * np.pi / n)
    return (np.cos(w) * np.float32(-0.5) + np.float32(0.5))[:n]


def stft_frames(x, n_fft: int, hop: int, window):
    """``torch.stft(center=False, onesided)`` of ``x [B, L]`` -> complex ``[B, frames, n_fft/2+1]``."""
    n = (x.shape[-1] - n_fft) // hop + 1
    idx = jnp.arange(n)[:, None] * hop + jnp.arange(n_fft)[None, :]
    return jnp.fft.rfft(x[:, idx] * window, axis=-1)


class DiscriminatorSTFT(nn.Module):
    n_fft: int
    filters: int = 32

    @nn.compact
    def __call__(self, x):
        win = self.variable("buffers", "spec_transform.window", lambda: jnp.asarray(hann_window(self.n_fft))).value
        z = stft_frames(x[:, 0], self.n_fft, self.n_fft // 4, win) / jnp.sqrt(jnp.sum(win * win))
        z = jnp.stack([z.real, z.imag], 1)                        # [B, 2, frames, freq]: time first
        f = self.filters
        fmap = []
        z = NormConv2d(f, 2, (3, 9), padding=(1, 4), plain=True, name="convs.0")(z)
        z = leaky_relu(z, 0.2)
        fmap.append(z)
        for i, d in enumerate((1, 2, 4)):
            z = NormConv2d(f, f, (3, 9), (1, 2), (d, 4), (d, 1), name=f"convs.{i + 1}")(z)
            z = leaky_relu(z, 0.2)
            fmap.append(z)
        z = NormConv2d(f, f, (3, 3), padding=(1, 1), name="convs.4")(z)
        z = leaky_relu(z, 0.2)
        fmap.append(z)
        z = NormConv2d(1, f, (3, 3), padding=(1, 1), name="conv_post")(z)
        return z, fmap


class NormConv2d(nn.Module):
    """EnCodec's ``NormConv2d``: the conv (weight-normed, or ``plain``) lives under ``.conv``."""
    out: int
    inp: int
    kernel: tuple
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    plain: bool = False

    @nn.compact
    def __call__(self, x):
        if self.plain:
            return PlainConv(self.out, self.inp, self.kernel, self.stride, self.padding, init_std=None, name="conv")(x)
        return WNConv(self.out, self.inp, self.kernel, self.stride, self.padding, self.dilation, name="conv")(x)


class MultiScaleSTFTDiscriminator(nn.Module):
    div: int = 1

    @nn.compact
    def __call__(self, y):
        outs = [DiscriminatorSTFT(n, 32 // self.div, name=f"discriminators.{i}")(y) for i, n in enumerate(STFT_NFFTS)]
        return [o[0] for o in outs], [o[1] for o in outs]


DISCRIMINATORS = {"mpd": MultiPeriodDiscriminator, "msd": MultiScaleDiscriminator,
                  "mstftd": MultiScaleSTFTDiscriminator}
