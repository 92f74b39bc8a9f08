"""Key-table vocabulary: one :class:`KeyRule` per official tensor name, with the layout transform
between the PyTorch tensor and the Flax leaf. Tables themselves live next to their models."""
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

    @staticmethod
    def linear_to_heads(heads: int, head_dim: int) -> Transform:
        """torch ``[heads*head_dim, in]`` <-> flax ``[in, heads, head_dim]``."""
        return Transform(f"linear_to_heads({heads},{head_dim})",
                         lambda a: a.T.reshape(a.shape[1], heads, head_dim),
                         lambda a: a.reshape(a.shape[0], heads * head_dim).T,
                         lambda s: (s[1] * s[2], s[0]))

    @staticmethod
    def split_heads(heads: int, head_dim: int) -> Transform:
        """torch bias ``[heads*head_dim]`` <-> flax ``[heads, head_dim]``."""
        return Transform(f"split_heads({heads},{head_dim})",
                         lambda a: a.reshape(heads, head_dim),
                         lambda a: a.reshape(heads * head_dim),
                         lambda s: (s[0] * s[1],))

    @staticmethod
    def heads_to_linear(heads: int, head_dim: int) -> Transform:
        """torch ``[out, heads*head_dim]`` <-> flax ``[heads, head_dim, out]``."""
        return Transform(f"heads_to_linear({heads},{head_dim})",
                         lambda a: a.T.reshape(heads, head_dim, a.shape[0]),
                         lambda a: a.reshape(heads * head_dim, a.shape[-1]).T,
                         lambda s: (s[2], s[0] * s[1]))


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
