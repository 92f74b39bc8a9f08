"""TiCodec, the speech tokenizer / vocoder of VITA-1.5 (``VQVAE`` in the official code).

Generator: codes (40 Hz) + 8 fixed global tokens -> 24 kHz waveform (HiFi-GAN style: conv_pre,
4 transposed-conv stages each followed by the mean of 3 ResBlock1s, the 128-d global vector added
where the channel count is 128, conv_post, tanh). Encoder + quantizer: waveform -> codes and global
tokens (for tokenising stage-3 training audio). Layout inside: ``[batch, time, channels]``.

The official ``final.pt`` stores old-style weight norm (``weight_g``, ``weight_v``); it is folded
into plain kernels once at load time (:func:`fold_state_dict`), exactly as ``remove_weight_norm``:
``W = g · v / ‖v‖`` with the norm over every axis but 0 (per output channel of a Conv1d, per
*input* channel of a ConvTranspose1d). Flax module names are the official ones with list indices
joined by ``_`` (``ups.0`` -> ``ups_0``).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

LRELU = 0.1


@dataclasses.dataclass(frozen=True)
class TiCodecConfig:
    upsample_rates: tuple = (8, 5, 5, 3)
    upsample_kernel_sizes: tuple = (16, 11, 11, 5)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple = (3, 7, 11)
    resblock_dilation_sizes: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    n_codes: int = 1024
    global_code_num: int = 8
    global_feature_conv: tuple = (128, 64, 128, 3, 1)
    global_tokens: tuple = (473, 975, 419, 219, 565, 121, 550, 616)
    sampling_rate: int = 24000
    code_dim: int = 512          # hard-coded in the official code (conv_pre input, encoder conv_post)

    @property
    def hop(self) -> int:
        return int(np.prod(self.upsample_rates))

    def to_model_json(self) -> dict:
        return dict(resblock="1", upsample_rates=list(self.upsample_rates),
                    upsample_kernel_sizes=list(self.upsample_kernel_sizes),
                    upsample_initial_channel=self.upsample_initial_channel,
                    resblock_kernel_sizes=list(self.resblock_kernel_sizes),
                    resblock_dilation_sizes=[list(d) for d in self.resblock_dilation_sizes], n_code_groups=1,
                    residul_layer=1, n_codes=self.n_codes, global_code_num=self.global_code_num,
                    global_feature_conv=list(self.global_feature_conv), global_tokens=list(self.global_tokens),
                    sampling_rate=self.sampling_rate)

    @classmethod
    def from_model_json(cls, path: str) -> "TiCodecConfig":
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a TiCodec model.json: {e}") from e

    @classmethod
    def from_dict(cls, h: dict) -> "TiCodecConfig":
        """From ``model.json``'s fields (KeyError / TypeError / ValueError on a missing or bad one)."""
        if str(h.get("resblock", "1")) != "1" or int(h.get("n_code_groups", 1)) != 1 or \
                int(h.get("residul_layer", 1)) != 1:
            raise ValueError("only resblock '1', n_code_groups 1 and residul_layer 1 are supported")
        return cls(upsample_rates=tuple(h["upsample_rates"]), upsample_kernel_sizes=tuple(h["upsample_kernel_sizes"]),
                   upsample_initial_channel=int(h["upsample_initial_channel"]),
                   resblock_kernel_sizes=tuple(h["resblock_kernel_sizes"]),
                   resblock_dilation_sizes=tuple(tuple(d) for d in h["resblock_dilation_sizes"]),
                   n_codes=int(h["n_codes"]), global_code_num=int(h["global_code_num"]),
                   global_feature_conv=tuple(h["global_feature_conv"]),
                   global_tokens=tuple(h.get("global_tokens", ())), sampling_rate=int(h.get("sampling_rate", 24000)))


def _pad(k: int, d: int = 1) -> int:
    return (k * d - d) // 2


class Conv1d(nn.Module):
    """PyTorch-style Conv1d on ``[B, T, C]``: kernel ``[k, in, out]``, symmetric padding."""
    features: int
    kernel: int
    stride: int = 1
    dilation: int = 1
    padding: int = 0
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.features, (self.kernel,), strides=(self.stride,), kernel_dilation=(self.dilation,),
                       padding=[(self.padding, self.padding)], use_bias=self.use_bias, name="conv")(x)


class ConvTranspose1d(nn.Module):
    """PyTorch ConvTranspose1d on ``[B, T, C]`` (kernel stored ``[k, in, out]``): zero-stuffing by
    ``stride``, padding ``k - 1 - padding`` each side, correlation with the flipped kernel."""
    features: int
    kernel: int
    stride: int
    padding: int

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.lecun_normal(), (self.kernel, x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        p = self.kernel - 1 - self.padding
        y = jax.lax.conv_general_dilated(x, w[::-1], (1,), [(p, p)], lhs_dilation=(self.stride,),
                                         dimension_numbers=("NWC", "WIO", "NWC"))
        return y + b


class ResBlock1(nn.Module):
    channels: int
    kernel: int
    dilations: Sequence[int]

    @nn.compact
    def __call__(self, x):
        for m, d in enumerate(self.dilations):
            t = Conv1d(self.channels, self.kernel, dilation=d, padding=_pad(self.kernel, d), name=f"convs1_{m}")(
                jax.nn.leaky_relu(x, LRELU))
            t = Conv1d(self.channels, self.kernel, padding=_pad(self.kernel), name=f"convs2_{m}")(
                jax.nn.leaky_relu(t, LRELU))
            x = x + t
        return x


class Generator(nn.Module):
    """``[B, T, 512]`` code embeddings + global vector ``[B, 128]`` -> waveform ``[B, hop·T]``."""
    cfg: TiCodecConfig

    @nn.compact
    def __call__(self, x, g):
        c = self.cfg
        nk = len(c.resblock_kernel_sizes)
        ch = c.upsample_initial_channel
        x = Conv1d(ch, 7, padding=3, name="conv_pre")(x)
        for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)):
            ch //= 2
            x = ConvTranspose1d(ch, k, u, (k - u) // 2, name=f"ups_{i}")(jax.nn.leaky_relu(x, LRELU))
            xs = sum(ResBlock1(ch, kk, dd, name=f"resblocks_{i * nk + j}")(x)
                     for j, (kk, dd) in enumerate(zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes)))
            x = xs / nk
            if ch == g.shape[-1]:
                x = x + g[:, None, :]
        x = Conv1d(1, 7, padding=3, name="conv_post")(jax.nn.leaky_relu(x, LRELU))
        return jnp.tanh(x)[..., 0]


class GlobalTokenEncoder(nn.Module):
    """3 x (conv, lrelu) -> time mean -> Linear -> lrelu -> BatchNorm (eval). ``[B, T, in] -> [B, out]``."""
    cfg: TiCodecConfig

    @nn.compact
    def __call__(self, x):
        cin, hid, cout, k, s = self.cfg.global_feature_conv
        for n, feats in zip((0, 2, 4), (hid, hid, cout)):
            x = jax.nn.leaky_relu(Conv1d(feats, k, stride=s, padding=(k - s) // 2, use_bias=False,
                                         name=f"conv_{n}")(x), LRELU)
        x = jnp.mean(x, axis=1)
        x = jax.nn.leaky_relu(nn.Dense(cout, name="fn_0")(x), LRELU)
        mean = self.param("bn_mean", nn.initializers.zeros, (cout,))
        var = self.param("bn_var", nn.initializers.ones, (cout,))
        scale = self.param("bn_scale", nn.initializers.ones, (cout,))
        bias = self.param("bn_bias", nn.initializers.zeros, (cout,))
        return (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias


class Encoder(nn.Module):
    """Waveform ``[B, L]`` -> ``(frames [B, L // hop, 512], global feature [B, 128])``."""
    cfg: TiCodecConfig

    @nn.compact
    def __call__(self, wav):
        c = self.cfg
        kernels = tuple(reversed(c.resblock_kernel_sizes))
        dilations = tuple(reversed(c.resblock_dilation_sizes))
        nk = len(kernels)
        x = Conv1d(32, 7, padding=3, name="conv_pre")(wav[..., None])
        ch, g = 32, None
        stages = list(zip(reversed(c.upsample_rates), reversed(c.upsample_kernel_sizes)))
        for i, (u, k) in enumerate(stages):
            ch *= 2
            x = Conv1d(ch, k, stride=u, padding=(k - u) // 2, name=f"ups_{i}")(jax.nn.leaky_relu(x, LRELU))
            xs = None
            for j in range(nk):
                r = ResBlock1(ch, kernels[j], dilations[j], name=f"resblocks_{i * nk + j}")(x)
                xs = r if xs is None else xs + r
                xs = nn.GroupNorm(num_groups=ch // 16, epsilon=1e-6, name=f"normalize_{i * nk + j}")(xs)
            x = xs / nk
            if i == len(stages) // 2 - 1:
                g = GlobalTokenEncoder(c, name="GlobalTokenEncoder")(x)
        x = Conv1d(c.code_dim, 3, padding=1, name="conv_post")(jax.nn.leaky_relu(x, 0.01))
        return x, g


def nearest(x, codebook):
    """Official VQ assignment: ``argmin (Σx² + Σe² − 2 x·eᵀ)`` (first index on ties). ``[N, d]`` -> ``[N]``."""
    d = jnp.sum(x * x, -1, keepdims=True) + jnp.sum(codebook * codebook, -1)[None] - 2.0 * x @ codebook.T
    return jnp.argmin(d, axis=-1)


def global_vector(quantizer, tokens):
    """Concatenated global codebook rows ``[128]`` for ``tokens [global_code_num]``."""
    return jnp.concatenate([quantizer["globaltokens"][j][t] for j, t in enumerate(tokens)])


# ------------------------------------------------------------------------------ weight folding
def _fold(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    norm = np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=tuple(range(1, v.ndim)), keepdims=True))
    return (g * (v / norm)).astype(np.float32)


def _module_path(torch_path: str) -> tuple:
    """``resblocks.3.convs1.2`` -> ``("resblocks_3", "convs1_2")``."""
    out = []
    for part in torch_path.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def fold_state_dict(sd: dict, transposed: Sequence[str] = ()) -> dict:
    """Official generator / encoder state dict (numpy) -> Flax params with weight norm folded.
    ``transposed``: module paths that are ConvTranspose1d."""
    flat, seen = {}, set()
    for key in sd:
        mod, _, leaf = key.rpartition(".")
        if mod in seen or leaf == "num_batches_tracked":
            continue
        if mod.startswith("GlobalTokenEncoder.fn.2"):
            names = {"running_mean": "bn_mean", "running_var": "bn_var", "weight": "bn_scale", "bias": "bn_bias"}
            flat[("GlobalTokenEncoder", names[leaf])] = np.asarray(sd[key], np.float32)
            continue
        path = _module_path(mod)
        if leaf in ("weight_g", "weight_v"):
            seen.add(mod)
            w = _fold(np.asarray(sd[mod + ".weight_g"]), np.asarray(sd[mod + ".weight_v"]))
            leaf = "weight"
        else:
            w = np.asarray(sd[key], np.float32)
        if mod.startswith("linear."):
            continue  # the encoder's linear.0 is never used by the official forward
        if leaf == "bias":
            target = path + ("bias",) if mod in transposed else path + ("conv", "bias") if _is_conv(sd, mod) \
                else path + ("bias",)
            flat[target] = w
        elif w.ndim == 3 and mod in transposed:
            flat[path + ("kernel",)] = w.transpose(2, 0, 1)      # torch [in, out, k] -> [k, in, out]
        elif w.ndim == 3:
            flat[path + ("conv", "kernel")] = w.transpose(2, 1, 0)  # torch [out, in, k] -> [k, in, out]
        elif w.ndim == 2:
            flat[path + ("kernel",)] = w.T
        else:
            flat[path + ("scale",)] = w                             # GroupNorm gain
    return traverse_util.unflatten_dict(flat)


def _is_conv(sd: dict, mod: str) -> bool:
    w = sd.get(mod + ".weight", sd.get(mod + ".weight_v"))
    return w is not None and np.ndim(w) == 3

