"""The official-name vocabulary of the key tables: one :class:`KeyRule` per official tensor name,
with the layout transform between the PyTorch tensor and the Flax leaf. Tables themselves live next to their models."""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
    """``to_flax``/``to_torch`` convert one (per-layer) tensor; ``torch_shape`` gives the PyTorch
    shape that a Flax leaf shape needs (used to check shapes before reading any data)."""
    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple], tuple]


class T:
    """The transforms the VITA tables need."""
    same = Transform("same", lambda a: a, lambda a: a, tuple)
    # Linear: torch [out, in] <-> flax Dense kernel [in, out]
    linear = Transform("linear", lambda a: a.T, lambda a: a.T, lambda s: tuple(reversed(s)))

    # Conv2d: torch [out, in, kh, kw] <-> flax [kh, kw, in, out]
    conv2d = Transform("conv2d", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1),
                       lambda s: (s[3], s[2], s[0], s[1]))
    # Conv1d: torch [out, in, k] <-> flax [k, in, out]
    conv1d = Transform("conv1d", lambda a: a.transpose(2, 1, 0), lambda a: a.transpose(2, 1, 0),
                       lambda s: (s[2], s[1], s[0]))

    @staticmethod
    def linear_to_heads(*out_dims: int) -> Transform:
        """torch ``[prod(out_dims), in]`` <-> flax ``[in, *out_dims]`` (e.g. ``(heads, head_dim)``)."""
        n = int(np.prod(out_dims))
        return Transform(f"linear_to_heads{out_dims}",
                         lambda a: a.T.reshape(a.shape[1], *out_dims),
                         lambda a: a.reshape(a.shape[0], n).T,
                         lambda s: (int(np.prod(s[1:])), s[0]))

    @staticmethod
    def split_heads(*dims: int) -> Transform:
        """torch ``[prod(dims)]`` <-> flax ``dims`` (biases of head-split projections)."""
        n = int(np.prod(dims))
        return Transform(f"split_heads{dims}", lambda a: a.reshape(dims), lambda a: a.reshape(n),
                         lambda s: (int(np.prod(s)),))

    @staticmethod
    def heads_to_linear(*in_dims: int) -> Transform:
        """torch ``[out, prod(in_dims)]`` <-> flax ``[*in_dims, out]``."""
        n = int(np.prod(in_dims))
        k = len(in_dims)
        return Transform(f"heads_to_linear{in_dims}",
                         lambda a: a.T.reshape(*in_dims, a.shape[0]),
                         lambda a: a.reshape(n, a.shape[-1]).T,
                         lambda s: (s[k], int(np.prod(s[:k]))))


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """``torch_key`` may contain ``{i}``: then the Flax leaf at ``flax_path`` stacks layers
    ``0..n-1`` on its leading axis (the ``nn.scan`` layout)."""
    torch_key: str
    flax_path: tuple
    transform: Transform

    @property
    def stacked(self) -> bool:
        return "{i}" in self.torch_key

    def keys(self, n_layers: int) -> list[str]:
        return [self.torch_key.format(i=i) for i in range(n_layers)] if self.stacked else [self.torch_key]
