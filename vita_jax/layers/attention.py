"""Grouped-query attention with q/k/v bias, rotary embeddings and an explicit KV cache.

The score/softmax/value product goes through ``jax.nn.dot_product_attention`` so that XLA picks
cuDNN flash attention on GPU (``implementation="cudnn"`` forces it; it needs right padding,
expressed as ``key_value_seq_lengths``, and 16-bit inputs).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vita_jax import parallel
from vita_jax.layers.rope import apply_rope

_init = nn.initializers.normal(0.02)


def causal_padding_mask(key_valid, q_slots, k_slots):
    """Boolean mask ``[batch, 1, q, k]``: key ``j`` is visible to query ``i`` when it holds a real
    token (``key_valid [batch, k]``) and its slot is not after the query's slot.
    ``q_slots [q]`` / ``k_slots [k]`` are the cache (or sequence) slot indices."""
    causal = k_slots[None, :] <= q_slots[:, None]
    return (causal[None] & key_valid[:, None, :])[:, None]


class Attention(nn.Module):
    """Qwen2 self-attention.

    ``x [batch, q, embed]``, ``cos/sin [batch, q, head_dim]``; ``mask [batch, 1, q, k]`` (bool) or,
    for ``implementation="cudnn"``, ``kv_lengths [batch]`` (right padding, causal).
    With ``cache=(k, v)`` of shape ``[batch, S, kv_heads, head_dim]`` the new keys/values are written
    at slot ``cache_index`` and attention runs over all ``S`` slots; the updated cache is returned.
    Returns ``(out [batch, q, embed], new_cache or None)``.
    """
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    implementation: Optional[str] = None
    use_bias: bool = True  # q/k/v biases (Qwen2: yes; Llama, the TTS decoder: no)

    @nn.compact
    def __call__(self, x, cos, sin, mask=None, kv_lengths=None, cache=None, cache_index=None):
        def proj(name, heads, axes):
            return nn.DenseGeneral(
                (heads, self.head_dim), axis=-1, use_bias=self.use_bias, dtype=self.dtype,
                param_dtype=self.param_dtype, name=name,
                kernel_init=nn.with_logical_partitioning(_init, ("embed",) + axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes))(x)

        q = proj("q_proj", self.num_heads, ("heads", "head_dim"))
        k = proj("k_proj", self.num_kv_heads, ("kv_heads", "head_dim"))
        v = proj("v_proj", self.num_kv_heads, ("kv_heads", "head_dim"))
        q = checkpoint_name(parallel.constrain(q, ("batch", "length", "act_heads", None)), "query_proj")
        k = checkpoint_name(parallel.constrain(k, ("batch", "length", "act_kv_heads", None)), "key_proj")
        v = checkpoint_name(parallel.constrain(v, ("batch", "length", "act_kv_heads", None)), "value_proj")
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        new_cache = None
        if cache is not None:
            ck, cv = cache
            zero = jnp.zeros((), jnp.int32)
            idx = (zero, jnp.asarray(cache_index, jnp.int32), zero, zero)
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), idx)
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), idx)
            new_cache = (ck, cv)
            k, v = ck.astype(self.dtype), cv.astype(self.dtype)

        if self.implementation == "cudnn" and cache is None and mask is None:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=kv_lengths,
                                               implementation="cudnn")
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation
                                               if self.implementation != "cudnn" else None)
        out = parallel.constrain(out, ("batch", "length", "act_heads", None))
        out = nn.DenseGeneral(
            self.hidden_size, axis=(-2, -1), use_bias=False, dtype=self.dtype,
            param_dtype=self.param_dtype, name="o_proj",
            kernel_init=nn.with_logical_partitioning(_init, ("heads", "head_dim", "embed")))(out)
        return checkpoint_name(out, "out_proj"), new_cache
