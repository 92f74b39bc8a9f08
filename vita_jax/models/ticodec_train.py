"""TiCodec in its *training* form (upstream TiCodec ``models.py`` as ``train.py`` runs it), beside the
folded inference form of :mod:`vita_jax.models.ticodec`.

* Layout is PyTorch's (``[B, C, T]``, kernels ``[out, in, k]``; ConvTranspose ``[in, out, k]``) so the
  official state dicts map 1:1: every Flax module / variable is named by its official key part
  (``ups.0``, ``resblocks.3``, ``conv_pre`` ...) and the official key of a leaf is its Flax path
  joined by ``.`` (:func:`official_items`). Collections: ``params`` (what the optimisers own) and
  ``buffers`` (BatchNorm running statistics, spectral-norm vectors, the MS-STFT window).
* Weight norm stays live: ``weight_g`` and ``weight_v`` are separate parameters, the kernel is
  ``g · v / ‖v‖`` (norm over every axis but 0) at every call.
* The global branch ends in BatchNorm1d in batch-statistics mode when ``buffers`` is mutable (running
  mean / unbiased running variance updated with momentum 0.1, ``num_batches_tracked`` + 1 per call),
  in eval mode otherwise.
* The quantizer is straight-through with codebook + commitment terms and no EMA (:func:`quantize`).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vita_jax.models.ticodec import TiCodecConfig

LRELU = 0.1


def leaky_relu(x, negative_slope: float = 0.01):
    """``F.leaky_relu`` exactly, value and gradient: torch computes ``x > 0 ? x : x·slope`` and its
    backward ``x > 0 ? g : g·slope``, so at ``x == 0`` the gradient is the slope. ``jax.nn.leaky_relu``
    (``where(x >= 0, ...)``) gives 1 there. Same values everywhere; only an exact-zero pre-activation's
    gradient differs. (Issue #24: the stage-3.1 MSD[0] gradient gap was *not* this, see docs/parity.md,
    but the training side keeps torch's convention so that such a zero can never be a difference.)"""
    return jnp.where(x > 0, x, negative_slope * x)


@dataclasses.dataclass(frozen=True)
class CodecTrainConfig:
    """The hyper-parameters ``train.py`` reads from ``model.json`` (same names)."""
    codec: TiCodecConfig
    segment_size: int = 24000
    num_mels: int = 80
    n_fft: int = 1024
    hop_size: int = 240
    win_size: int = 1024
    fmin: float = 0
    fmax: Optional[float] = 8000
    fmax_for_loss: Optional[float] = None
    learning_rate: float = 2e-4
    adam_b1: float = 0.5
    adam_b2: float = 0.9
    lr_decay: float = 0.98
    batch_size: int = 160
    seed: int = 1234
    codebook_loss_lambda: float = 1.0
    commitment_loss_lambda: float = 0.25
    disc_div: int = 1  # discriminator channel divisor (1, 2, 4 or 8): not upstream's; only tiny configs change it

    @property
    def sampling_rate(self) -> int:
        return self.codec.sampling_rate

    @classmethod
    def from_model_json(cls, path: str) -> "CodecTrainConfig":
        try:
            with open(path) as f:
                h = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a TiCodec model.json: {e}") from e
        return cls.from_dict(h, path)

    @classmethod
    def from_dict(cls, h: dict, where: str = "config.codec") -> "CodecTrainConfig":
        """From ``model.json``'s fields; ``where`` names the source in the one-line error."""
        names = {f.name for f in dataclasses.fields(cls)} - {"codec"}
        try:
            return cls(codec=TiCodecConfig.from_dict(h), **{k: h[k] for k in names if k in h})
        except KeyError as e:
            raise ValueError(f"{where}: missing TiCodec field {e}") from e
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: bad TiCodec training field: {e}") from e

    def to_model_json(self) -> dict:
        out = self.codec.to_model_json()
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name != "codec" and not (f.name == "disc_div" and self.disc_div == 1)})
        out.update(num_gpus=1, num_freq=self.n_fft // 2 + 1, num_workers=0)
        return out


def real_size_config() -> CodecTrainConfig:
    """VITA-1.5's released codec (``vita_tts_ckpt/codec/model.json``, = Freeze-Omni's; spec
    VITA15_SPEECH_OUTPUT §2.1) with its training fields (upstream TiCodec's recipe: batch 160 of 1 s
    at 24 kHz over 8 GPUs, Adam 2e-4 (0.5, 0.9), decay 0.98 per epoch): stage 3.1 at full size."""
    codec = TiCodecConfig(upsample_rates=(8, 5, 5, 3), upsample_kernel_sizes=(16, 11, 11, 5),
                          upsample_initial_channel=512, resblock_kernel_sizes=(3, 7, 11),
                          resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)), n_codes=1024, global_code_num=8,
                          global_feature_conv=(128, 64, 128, 3, 1),
                          global_tokens=(473, 975, 419, 219, 565, 121, 550, 616), sampling_rate=24000)
    return CodecTrainConfig(codec=codec, segment_size=24000, num_mels=80, n_fft=1024, hop_size=240, win_size=1024,
                            fmin=0, fmax=8000, fmax_for_loss=None, learning_rate=2e-4, adam_b1=0.5, adam_b2=0.9,
                            lr_decay=0.98, batch_size=160, seed=1234, codebook_loss_lambda=1.0,
                            commitment_loss_lambda=0.25)

# ------------------------------------------------------------------------------ layers (torch layout)
def conv(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, lhs_dilation=None):
    """PyTorch ``Conv1d`` / ``Conv2d`` (``x [B, C, *spatial]``, ``w [out, in/groups, *k]``)."""
    nd = w.ndim - 2
    tup = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd  # noqa: E731
    dn = ("NCH", "OIH", "NCH") if nd == 1 else ("NCHW", "OIHW", "NCHW")
    y = jax.lax.conv_general_dilated(x, w, tup(stride), [(p, p) for p in tup(padding)], lhs_dilation=lhs_dilation,
                                     rhs_dilation=tup(dilation), dimension_numbers=dn, feature_group_count=groups)
    return y if b is None else y + b.reshape((1, -1) + (1,) * nd)


def weight_norm(g, v):
    """``torch.nn.utils.weight_norm`` (dim 0): ``v · (g / ‖v‖)`` with the norm over every axis but 0."""
    return v * (g / jnp.sqrt(jnp.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True)))


def _torch_uniform(bound):
    return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class WNConv(nn.Module):
    """Weight-normed Conv1d / Conv2d (``kernel`` a tuple of 1 or 2 sizes); official init: v from
    PyTorch's default conv init (kaiming-uniform a=√5), g = ‖v‖."""
    out: int
    inp: int
    kernel: tuple
    stride: tuple | int = 1
    padding: tuple | int = 0
    dilation: tuple | int = 1
    groups: int = 1

    @nn.compact
    def __call__(self, x):
        fan_in = self.inp // self.groups * int(np.prod(self.kernel))
        bias = self.param("bias", _torch_uniform(fan_in ** -0.5), (self.out,))
        v = self.param("weight_v", _torch_uniform(fan_in ** -0.5), (self.out, self.inp // self.groups, *self.kernel))
        g = self.param("weight_g", lambda _: jnp.sqrt(jnp.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True)))
        return conv(x, weight_norm(g, v), bias, self.stride, self.padding, self.dilation, self.groups)


class WNConvTranspose1d(nn.Module):
    """Weight-normed ConvTranspose1d (``weight_v [in, out, k]``, g per *input* channel)."""
    out: int
    inp: int
    kernel: int
    stride: int
    padding: int

    @nn.compact
    def __call__(self, x):
        bound = (self.out * self.kernel) ** -0.5  # torch's fan_in of a transposed weight is dim 1 · k
        bias = self.param("bias", _torch_uniform(bound), (self.out,))
        v = self.param("weight_v", _torch_uniform(bound), (self.inp, self.out, self.kernel))
        g = self.param("weight_g", lambda _: jnp.sqrt(jnp.sum(v * v, axis=(1, 2), keepdims=True)))
        w = weight_norm(g, v).transpose(1, 0, 2)[:, :, ::-1]          # -> [out, in, k], flipped
        p = self.kernel - 1 - self.padding
        return conv(x, w, bias, padding=p, lhs_dilation=(self.stride,))


class PlainConv(nn.Module):
    """Conv1d / Conv2d with ``weight`` (and ``bias``); init normal(0, ``init_std``) as upstream's
    ``init_weights``, or PyTorch's default conv init when ``init_std`` is None."""
    out: int
    inp: int
    kernel: tuple
    stride: tuple | int = 1
    padding: tuple | int = 0
    use_bias: bool = True
    init_std: Optional[float] = 0.01

    @nn.compact
    def __call__(self, x):
        fan_in = self.inp * int(np.prod(self.kernel))
        init = _torch_uniform(fan_in ** -0.5) if self.init_std is None else nn.initializers.normal(self.init_std)
        w = self.param("weight", init, (self.out, self.inp, *self.kernel))
        b = self.param("bias", _torch_uniform(fan_in ** -0.5), (self.out,)) if self.use_bias else None
        return conv(x, w, b, self.stride, self.padding)


class Linear(nn.Module):
    """``torch.nn.Linear`` (``weight [out, in]``)."""
    out: int
    inp: int

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", _torch_uniform(self.inp ** -0.5), (self.out, self.inp))
        b = self.param("bias", _torch_uniform(self.inp ** -0.5), (self.out,))
        return x @ w.T + b


class GroupNorm(nn.Module):
    """``torch.nn.GroupNorm`` on ``[B, C, T]`` (biased variance of the centred values)."""
    groups: int
    channels: int
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (self.channels,))
        b = self.param("bias", nn.initializers.zeros, (self.channels,))
        B, C, T = x.shape
        xg = x.reshape(B, self.groups, -1)
        mean = jnp.mean(xg, -1, keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), -1, keepdims=True)
        y = ((xg - mean) / jnp.sqrt(var + self.eps)).reshape(B, C, T)
        return y * w[None, :, None] + b[None, :, None]


class BatchNorm1d(nn.Module):
    """``torch.nn.BatchNorm1d`` on ``[B, C]``: batch statistics when ``buffers`` is mutable (training)."""
    channels: int
    momentum: float = 0.1
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (self.channels,))
        b = self.param("bias", nn.initializers.zeros, (self.channels,))
        rm = self.variable("buffers", "running_mean", jnp.zeros, (self.channels,))
        rv = self.variable("buffers", "running_var", jnp.ones, (self.channels,))
        nbt = self.variable("buffers", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        if self.is_mutable_collection("buffers") and not self.is_initializing():
            n = x.shape[0]
            mean = jnp.mean(x, 0)
            var = jnp.mean(jnp.square(x - mean), 0)
            m = self.momentum
            rm.value = (1 - m) * rm.value + m * jax.lax.stop_gradient(mean)
            rv.value = (1 - m) * rv.value + m * jax.lax.stop_gradient(var * n / (n - 1))
            nbt.value = nbt.value + 1
        else:
            mean, var = rm.value, rv.value
        return (x - mean) / jnp.sqrt(var + self.eps) * w + b


class ResBlock1(nn.Module):
    channels: int
    kernel: int
    dilations: tuple

    @nn.compact
    def __call__(self, x):
        c, k = self.channels, self.kernel
        for m, d in enumerate(self.dilations):
            t = WNConv(c, c, (k,), padding=(k * d - d) // 2, dilation=d, name=f"convs1.{m}")(
                leaky_relu(x, LRELU))
            t = WNConv(c, c, (k,), padding=(k - 1) // 2, name=f"convs2.{m}")(leaky_relu(t, LRELU))
            x = t + x
        return x


class Generator(nn.Module):
    """Quantized frames ``[B, 512, T]`` + global vector ``[B, 128]`` -> waveform ``[B, 1, hop·T]``."""
    cfg: TiCodecConfig

    @nn.compact
    def __call__(self, x, g):
        c = self.cfg
        nk, ch = len(c.resblock_kernel_sizes), c.upsample_initial_channel
        x = WNConv(ch, c.code_dim, (7,), padding=3, name="conv_pre")(x)
        self.sow("intermediates", "conv_pre_out", x)
        for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)):
            x = WNConvTranspose1d(ch // 2, ch, k, u, (k - u) // 2, name=f"ups.{i}")(leaky_relu(x, LRELU))
            self.sow("intermediates", f"ups{i}_out", x)
            ch //= 2
            xs = None
            for j, (kk, dd) in enumerate(zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes)):
                r = ResBlock1(ch, kk, tuple(dd), name=f"resblocks.{i * nk + j}")(x)
                xs = r if xs is None else xs + r
            x = xs / nk
            if ch == g.shape[-1]:
                x = x + g[:, :, None]
        x = leaky_relu(x, LRELU)
        self.sow("intermediates", "conv_post_in", x)
        return jnp.tanh(WNConv(1, ch, (7,), padding=3, name="conv_post")(x))


class GlobalTokenEncoder(nn.Module):
    """3 x (conv no bias, lrelu 0.1) -> time mean -> Linear -> lrelu 0.1 -> BatchNorm1d. ``[B, in, T] -> [B, out]``."""
    cfg: TiCodecConfig

    @nn.compact
    def __call__(self, x):
        cin, hid, cout, k, s = self.cfg.global_feature_conv
        for n, (i, o) in zip((0, 2, 4), ((cin, hid), (hid, hid), (hid, cout))):
            x = leaky_relu(PlainConv(o, i, (k,), s, (k - s) // 2, use_bias=False, name=f"conv.{n}")(x), LRELU)
        x = Linear(cout, cout, name="fn.0")(jnp.mean(x, axis=2))
        self.sow("intermediates", "linear", x)
        x = leaky_relu(x, LRELU)
        self.sow("intermediates", "prebn", x)
        return BatchNorm1d(cout, name="fn.2")(x)


class Encoder(nn.Module):
    """Crop 1 ``[B, 1, L]`` (and the global crop) -> ``(c [B, 512, L/hop], g1 [B, 128], g2 or None)``;
    ``g2`` (stages 1-2 + the global branch on the second crop) is detached as upstream."""
    cfg: TiCodecConfig

    @nn.compact
    def __call__(self, y, y_global=None):
        c = self.cfg
        stages = list(reversed(list(zip(c.upsample_rates, c.upsample_kernel_sizes))))
        kernels, dils = list(reversed(c.resblock_kernel_sizes)), list(reversed(c.resblock_dilation_sizes))
        nk, half = len(kernels), len(stages) // 2
        conv_pre = WNConv(32, 1, (7,), padding=3, name="conv_pre")
        norms, ups, rbs = [], [], []
        for i, (u, k) in enumerate(stages):
            ch = 32 * 2 ** (i + 1)
            for j in range(nk):  # upstream registers normalize before ups / resblocks (state-dict order)
                norms.append(GroupNorm(ch // 16, ch, name=f"normalize.{i * nk + j}"))
        for i, (u, k) in enumerate(stages):
            ch = 32 * 2 ** (i + 1)
            ups.append(WNConv(ch, ch // 2, (k,), stride=u, padding=(k - u) // 2, name=f"ups.{i}"))
        for i in range(len(stages)):
            ch = 32 * 2 ** (i + 1)
            rbs += [ResBlock1(ch, kernels[j], tuple(dils[j]), name=f"resblocks.{i * nk + j}") for j in range(nk)]
        conv_post = PlainConv(c.code_dim, c.code_dim, (3,), padding=1, name="conv_post")
        linear = Linear(128, 128, name="linear.0")  # defined upstream, never used by forward
        gte = GlobalTokenEncoder(c, name="GlobalTokenEncoder")
        if self.is_initializing():
            linear(jnp.zeros((1, 128)))

        def run(x, lo, hi):
            for i in range(lo, hi):
                x = ups[i](leaky_relu(x, LRELU))
                xs = None
                for j in range(nk):
                    r = rbs[i * nk + j](x)
                    xs = norms[i * nk + j](r if xs is None else xs + r)
                x = xs / nk
            return x

        x = conv_pre(y)
        self.sow("intermediates", "conv_pre_out1", x)
        mid = run(x, 0, half)
        self.sow("intermediates", "mid1", mid)
        g1 = gte(mid)
        out = conv_post(leaky_relu(run(mid, half, len(stages)), 0.01))
        g2 = None
        if y_global is not None:
            x2 = conv_pre(y_global)
            self.sow("intermediates", "conv_pre_out2", x2)
            mid2 = run(x2, 0, half)
            self.sow("intermediates", "mid2", mid2)
            g2 = jax.lax.stop_gradient(gte(mid2))
        return out, g1, g2


# ------------------------------------------------------------------------------ quantizer
def quantizer_init(cfg: TiCodecConfig, key) -> dict:
    """Official codebook init: uniform(-1/n_codes, 1/n_codes); keys as in the ``quantizer`` state dict."""
    n, gd = cfg.n_codes, 128 // cfg.global_code_num
    keys = jax.random.split(key, cfg.global_code_num + 1)
    u = lambda k, s: jax.random.uniform(k, s, jnp.float32, -1.0 / n, 1.0 / n)  # noqa: E731
    out = {"quantizer_modules.0.embedding.weight": u(keys[0], (n, cfg.code_dim))}
    for j in range(cfg.global_code_num):
        out[f"quantizer_modules_globaltokens.{j}.embedding.weight"] = u(keys[j + 1], (n, gd))
    return out


def _vq(x, book):
    """``x [N, d]`` -> (nearest rows, codes); distance ``Σx² + Σe² − 2x·e`` as upstream."""
    d = jnp.sum(x * x, 1, keepdims=True) + jnp.sum(book * book, 1) - 2.0 * x @ book.T
    idx = jnp.argmin(d, 1)
    return book[idx], idx


def quantize(qparams: dict, c, g, cfg: TiCodecConfig, lam_book: float = 1.0, lam_commit: float = 0.25):
    """Upstream ``Quantizer.forward`` (one residual level, one code group): ``c [B, 512, T]``,
    ``g [B, 128]`` -> ``(q [B, 512, T], loss, codes [B, T], g_q [B, 128], tokens [B, G])``."""
    sg = jax.lax.stop_gradient
    B, D, T = c.shape
    x = c.transpose(0, 2, 1).reshape(-1, D)
    z, codes = _vq(x, qparams["quantizer_modules.0.embedding.weight"])
    z = z.reshape(B, T, D)
    xin = c.transpose(0, 2, 1)
    loss_local = lam_book * jnp.mean(jnp.square(z - sg(xin))) + lam_commit * jnp.mean(jnp.square(sg(z) - xin))
    q = (xin + sg(z - xin)).transpose(0, 2, 1)
    G = cfg.global_code_num
    chunks = jnp.split(g.reshape(-1, 128), G, axis=-1)
    zs, toks = zip(*[_vq(ch, qparams[f"quantizer_modules_globaltokens.{j}.embedding.weight"])
                     for j, ch in enumerate(chunks)])
    zg = jnp.concatenate(zs, -1).reshape(g.shape)
    loss_global = lam_book * jnp.mean(jnp.square(zg - sg(g))) + lam_commit * jnp.mean(jnp.square(sg(zg) - g))
    gq = g + sg(zg - g)
    aux = dict(local_loss=loss_local, global_loss=loss_global)
    return q, loss_local + loss_global, codes.reshape(B, T), gq, jnp.stack(toks, -1), aux
