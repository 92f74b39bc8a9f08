"""Normalisation layers."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class RMSNorm(nn.Module):
    """Qwen2/Llama RMSNorm: statistics in float32, result cast back to the input dtype *before*
    the weight multiply (as HF does). ``x [..., dim]`` -> same shape and dtype as ``x``."""
    dim: int
    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                            (self.dim,), self.param_dtype)
        in_dtype = x.dtype
        h = x.astype(jnp.float32)
        h = h * jnp.reciprocal(jnp.sqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps))
        return weight.astype(in_dtype) * h.astype(in_dtype)
