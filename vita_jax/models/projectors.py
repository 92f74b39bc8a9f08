"""From vision-tower features to LLM-width tokens: VITA's ×0.5 pixel shuffle and the
``mlp2x_gelu`` projector (official keys ``model.mm_projector.0`` / ``.2``)."""
from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from vita_jax import parallel
from vita_jax.models.keys import KeyRule, T

_init = nn.initializers.normal(0.02)


def pixel_shuffle(features, scale_features: float = 0.5):
    """``[n, 1 + g*g, C]`` ViT output (CLS first) -> ``[n, (g/2)^2, 4C]``.

    Drops CLS, multiplies by 0.5 (an official quirk, kept for checkpoint parity), then 2x2
    space-to-depth: token (i, j) = concat of patches (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1)."""
    x = features[:, 1:]
    g = int(round(x.shape[1] ** 0.5))
    if g * g != x.shape[1] or g % 2:
        raise ValueError(f"pixel shuffle needs an even square patch grid, got {x.shape[1]} patches")
    x = x.reshape(x.shape[0], g, g, x.shape[-1]) * scale_features
    return einops.rearrange(x, "n (h p1) (w p2) c -> n (h w) (p1 p2 c)", p1=2, p2=2)


class MLPProjector(nn.Module):
    """``mlp2x_gelu``: Linear(in -> out), exact GELU, Linear(out -> out). ``[..., in] -> [..., out]``."""
    out_features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        def dense(name, axes):
            return nn.Dense(self.out_features, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                            kernel_init=nn.with_logical_partitioning(_init, axes),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))
        x = jax.nn.gelu(dense("0", ("mm_in", "embed"))(x.astype(self.dtype)), approximate=False)
        x = dense("2", ("mlp", "embed"))(x)
        return parallel.constrain(x, ("batch", "length", "act_embed"))


def projector_key_table(prefix: str = "model.mm_projector.") -> list[KeyRule]:
    return [KeyRule(f"{prefix}{i}.{w}", (str(i), "kernel" if w == "weight" else "bias"),
                    T.linear if w == "weight" else T.same) for i in (0, 2) for w in ("weight", "bias")]
