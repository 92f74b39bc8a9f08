"""Normalisation layers."""
from __future__ import annotations

import flax.linen as nn
import jax
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


class LayerNorm(nn.Module):
    """LayerNorm with PyTorch parameter names (``weight``, ``bias``), statistics in float32.
    ``x [..., dim]`` -> same shape and dtype."""
    dim: int
    eps: float = 1e-5
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                            (self.dim,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                          (self.dim,), self.param_dtype)
        h = x.astype(jnp.float32)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
