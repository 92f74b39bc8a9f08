"""The PyTorch-layout layers of TiCodec and its discriminators (``[B, C, T]``, kernels ``[out, in, k]``,
ConvTranspose ``[in, out, k]``), each variable named as its official state-dict key part.

Weight norm (``torch.nn.utils.weight_norm``, dim 0) is either live (``weight_g`` and ``weight_v``, the
kernel ``g · v / ‖v‖`` at every call: training) or folded (one ``weight``, made once at load by
:func:`fold_weight_norm`, as ``remove_weight_norm``: inference) — the same module either way.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

LRELU = 0.1


def leaky_relu(x, negative_slope: float = 0.01):
    """``F.leaky_relu`` exactly, value and gradient: torch computes ``x > 0 ? x : x·slope`` and its
    backward ``x > 0 ? g : g·slope``, so at ``x == 0`` the gradient is the slope; ``jax.nn.leaky_relu``
    (``where(x >= 0, ...)``) gives 1 there. Same values everywhere; only an exact-zero pre-activation's
    gradient differs. (Issue #24: the stage-3.1 MSD[0] gradient gap was *not* this, see docs/parity.md,
    but TiCodec and its discriminators keep torch's convention so that such a zero is never a difference.)"""
    return jnp.where(x > 0, x, negative_slope * x)


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


def fold_weight_norm(g, v) -> np.ndarray:
    """The folded kernel ``g · v / ‖v‖`` (numpy, the norm in float64), once at load: the ``weight`` of a
    ``folded`` :class:`WNConv` / :class:`WNConvTranspose1d` from the official ``weight_g`` / ``weight_v``."""
    g, v = np.asarray(g), np.asarray(v)
    norm = np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=tuple(range(1, v.ndim)), keepdims=True))
    return (g * (v / norm)).astype(np.float32)


def _torch_uniform(bound):
    return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _wn_kernel(mod: nn.Module, init, shape: tuple):
    """A weight-normed module's kernel: ``weight`` when ``mod.folded``, else ``weight_norm(weight_g, weight_v)``."""
    if mod.folded:
        return mod.param("weight", init, shape)
    v = mod.param("weight_v", init, shape)
    g = mod.param("weight_g", lambda _: jnp.sqrt(jnp.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True)))
    return weight_norm(g, v)


class WNConv(nn.Module):
    """Weight-normed Conv1d / Conv2d (``kernel`` a tuple of 1 or 2 sizes); official init: v from
    PyTorch's default conv init (kaiming-uniform a=√5), g = ‖v‖. ``folded``: one ``weight`` instead."""
    out: int
    inp: int
    kernel: tuple
    stride: tuple | int = 1
    padding: tuple | int = 0
    dilation: tuple | int = 1
    groups: int = 1
    folded: bool = False

    @nn.compact
    def __call__(self, x):
        fan_in = self.inp // self.groups * int(np.prod(self.kernel))
        bias = self.param("bias", _torch_uniform(fan_in ** -0.5), (self.out,))
        w = _wn_kernel(self, _torch_uniform(fan_in ** -0.5), (self.out, self.inp // self.groups, *self.kernel))
        return conv(x, w, bias, self.stride, self.padding, self.dilation, self.groups)


class WNConvTranspose1d(nn.Module):
    """Weight-normed ConvTranspose1d (``weight_v [in, out, k]``, g per *input* channel; ``folded``: ``weight``)."""
    out: int
    inp: int
    kernel: int
    stride: int
    padding: int
    folded: bool = False

    @nn.compact
    def __call__(self, x):
        bound = (self.out * self.kernel) ** -0.5  # torch's fan_in of a transposed weight is dim 1 · k
        bias = self.param("bias", _torch_uniform(bound), (self.out,))
        w = _wn_kernel(self, _torch_uniform(bound), (self.inp, self.out, self.kernel))
        w = w.transpose(1, 0, 2)[:, :, ::-1]          # -> [out, in, k], flipped
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
