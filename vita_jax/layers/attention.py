"""Grouped-query attention with q/k/v bias, rotary embeddings and an explicit KV cache.

Kernels (``implementation``; :func:`resolve_implementation` turns ``"auto"`` into one of them per
platform, at trace time):

* ``"splash"`` (TPU, the ``auto`` choice there for training/scoring forwards): the Pallas splash
  attention kernel (:mod:`vita_jax.layers.splash`), causal with segment ids, so packed rows and
  padding cost no dense mask. The model passes ``segment_ids`` instead of a mask.
* ``"tokamax"`` (GPU, the ``auto`` choice there for packed rows, and for unpacked rows cuDNN does not
  take: 32-bit compute, head_dim not a multiple of 8 or over 128): flash attention from the tokamax
  kernel library (:mod:`vita_jax.layers.flash`; Mosaic GPU on sm90/sm100, else Triton, else XLA
  chunked), causal with the same segment ids as splash, as a per-query start of its segment: no
  ``[L, L]`` float scores. tokamax is imported only when this path runs.
* ``"cudnn"`` (GPU, the ``auto`` choice there for unpacked 16-bit forwards): cuDNN flash attention
  through ``jax.nn.dot_product_attention(implementation="cudnn")``, causal with
  ``key_value_seq_lengths`` (right padding only). jax 0.10.2's public ``dot_product_attention`` takes
  sequence lengths, not segment ids, so an explicit ``"cudnn"`` sends packed rows (and cached
  decoding, and 32-bit compute) to the XLA masked path. (The private ``jax._src.cudnn`` entry point
  has a packed layout with per-segment offsets, Hopper only; not used here.)
* ``"xla"`` / ``None`` (CPU and everything else): ``jax.nn.dot_product_attention`` with the dense
  boolean mask ``[batch, 1, q, k]`` (causal & padding & same segment).

A ``mask`` given as a :class:`vita_jax.layers.chunked.PrefixLMMask` (a rule of positions, not an array) takes
:func:`vita_jax.layers.chunked.chunked_attention` whatever the implementation: query blocks in a scan, no
``[q, k]`` value kept for the backward.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vita_jax import parallel
from vita_jax.layers.chunked import PrefixLMMask, chunked_attention
from vita_jax.layers.flash import flash_attention
from vita_jax.layers.rope import apply_rope
from vita_jax.layers.splash import splash_attention

IMPLEMENTATIONS = (None, "auto", "xla", "cudnn", "splash", "tokamax")

_init = nn.initializers.normal(0.02)


def causal_padding_mask(key_valid, q_slots, k_slots):
    """Boolean mask ``[batch, 1, q, k]``: key ``j`` is visible to query ``i`` when it holds a real
    token (``key_valid [batch, k]``) and its slot is not after the query's slot.
    ``q_slots [q]`` (or ``[batch, q]``: rows writing at different slots) / ``k_slots [k]`` are the
    cache (or sequence) slot indices."""
    causal = k_slots <= q_slots[..., None]            # [q, k], or [batch, q, k] for per-row slots
    causal = causal[None] if causal.ndim == 2 else causal
    return (causal & key_valid[:, None, :])[:, None]


def resolve_implementation(impl: Optional[str], dtype, head_dim: int, packed: bool, cached: bool) -> Optional[str]:
    """The kernel a forward uses. ``"auto"``: ``"splash"`` on TPU (no cache); on GPU (no cache)
    ``"cudnn"`` for unpacked rows it takes (16-bit compute, head_dim a multiple of 8 up to 128) and
    ``"tokamax"`` for packed rows and the other unpacked ones (``"xla"`` when tokamax is not
    installed); else ``"xla"``.
    An explicit ``"cudnn"`` keeps its old meaning (packed or cached forwards take the mask path);
    ``"splash"`` and ``"tokamax"`` apply to every cache-free forward, on any platform (splash with
    ``interpret`` off TPU, tokamax with its XLA chunked kernel off GPU)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl {impl!r}: expected one of {IMPLEMENTATIONS}")
    if impl != "auto":
        return impl
    platform = parallel.current_platform()
    if cached:
        return "xla"
    if platform == "tpu":
        return "splash"
    if platform == "gpu":
        cudnn = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
        if cudnn and not packed:
            return "cudnn"
        return "tokamax" if have_tokamax() else "xla"  # without the "gpu" extra: the old masked path
    return "xla"


def have_tokamax() -> bool:
    """Whether tokamax is installed (found, not imported: its import loads every kernel module)."""
    return importlib.util.find_spec("tokamax") is not None


class Attention(nn.Module):
    """Qwen2 self-attention.

    ``x [batch, q, embed]``, ``cos/sin [batch, q, head_dim]``; ``mask [batch, 1, q, k]`` (bool) or,
    for ``implementation="cudnn"``, ``kv_lengths [batch]`` (right padding, causal), or, for the
    splash and tokamax kernels, ``segment_ids [batch, q]`` (kernel ids,
    :func:`vita_jax.layers.splash.kernel_segment_ids`; causal). ``interpret`` runs splash in the Pallas
    interpreter (tests on CPU).
    With ``cache=(k, v)`` of shape ``[batch, S, kv_heads, head_dim]`` the new keys/values are written
    at slot ``cache_index`` (a scalar, or ``[batch]``: one slot per row) and attention runs over all
    ``S`` slots; the updated cache is returned.
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
    interpret: bool = False  # splash kernel in the Pallas interpreter (debug / CPU tests)

    @nn.compact
    def __call__(self, x, cos, sin, mask=None, kv_lengths=None, cache=None, cache_index=None, segment_ids=None):
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
            ci = jnp.asarray(cache_index, jnp.int32)
            if ci.ndim == 0:
                zero = jnp.zeros((), jnp.int32)
                idx = (zero, ci, zero, zero)
                ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), idx)
                cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), idx)
            else:  # one write slot per row (rows of a serving batch at different lengths)
                rows, cols = jnp.arange(ck.shape[0])[:, None], ci[:, None] + jnp.arange(k.shape[1])
                ck = ck.at[rows, cols].set(k.astype(ck.dtype))
                cv = cv.at[rows, cols].set(v.astype(cv.dtype))
            new_cache = (ck, cv)
            k, v = ck.astype(self.dtype), cv.astype(self.dtype)

        if isinstance(mask, PrefixLMMask):  # a mask given as a rule (the speech decoder's training forward)
            if cache is not None:
                raise ValueError("a PrefixLMMask is for cache-free forwards")
            out = chunked_attention(q, k, v, mask)
        elif segment_ids is not None and cache is None and mask is None:
            if resolve_implementation(self.implementation, self.dtype, self.head_dim, True, False) == "tokamax":
                out = flash_attention(q, k, v, segment_ids)
            else:
                out = splash_attention(q, k, v, segment_ids, interpret=self.interpret)
        elif (self.implementation == "cudnn" or kv_lengths is not None) and cache is None and mask is None:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=kv_lengths,
                                               implementation="cudnn")
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation
                                               if self.implementation == "xla" else None)
        out = parallel.constrain(out, ("batch", "length", "act_heads", None))
        out = nn.DenseGeneral(
            self.hidden_size, axis=(-2, -1), use_bias=False, dtype=self.dtype,
            param_dtype=self.param_dtype, name="o_proj",
            kernel_init=nn.with_logical_partitioning(_init, ("heads", "head_dim", "embed")))(out)
        return checkpoint_name(out, "out_proj"), new_cache
