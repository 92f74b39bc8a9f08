"""Rotary position embeddings, HF "rotate-half" convention (no permutation of q/k weights)."""
from __future__ import annotations

import jax.numpy as jnp


def rope_cos_sin(positions, head_dim: int, theta: float):
    """``positions [batch, length]`` (int) -> ``(cos, sin)`` each ``[batch, length, head_dim]`` float32.

    Same arithmetic as transformers' Qwen2RotaryEmbedding: float32 inverse frequencies, the outer
    product in float32, the half-spectrum repeated (not interleaved)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.int32).astype(jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """``x [batch, length, heads, head_dim]`` rotated by ``cos/sin [batch, length, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * c + rotated * s
