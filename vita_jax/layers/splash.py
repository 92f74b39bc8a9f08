"""Causal, segment-aware attention on TPU: the Pallas splash attention kernel.

:func:`splash_attention` takes the model's ``[batch, length, heads, head_dim]`` layout and
``segment_ids [batch, length]`` in the kernel's convention: a query sees a key when both have the
same id and the key is not after the query (packed rows: one id per example; padding: an id no
real token has, e.g. -1, so padding only sees padding and no row is ever fully masked).

The kernel is per device and per example: it is vmapped over the batch and, inside a
:func:`vita_jax.parallel.use_mesh` block on a mesh of more than one device, wrapped in
``shard_map`` over the mesh axes the logical rules give the batch and heads (never the sequence:
the kernel cannot split keys). Grouped-query attention needs no copies: the kernel's MHA form maps
query head ``h`` to key/value head ``h // (heads // kv_heads)``, as ``jax.nn.dot_product_attention``
does. Only when the rules shard query heads and key/value heads differently (e.g. 4 KV heads on a
tensor axis of 8) are keys/values repeated to one per query head first.

Sequences are padded to a multiple of 128 (the kernel's smallest block); blocks are the largest of
512/256/128 that divide the padded length. ``interpret=True`` runs the kernel in the Pallas
interpreter (any backend, slow): for tests on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import (
    BlockSizes,
    CausalMask,
    MultiHeadMask,
    SegmentIds,
    make_splash_mha,
)
from jax.sharding import PartitionSpec as P

from vita_jax import parallel

LANES = 128  # the kernel's block sizes are multiples of this
PAD_SEGMENT = -1  # segment id of padding (kernel convention): matches no real token


def block_size(length: int) -> int:
    """Largest of 512, 256, 128 that divides ``length`` (a multiple of 128)."""
    return next(b for b in (512, 256, LANES) if length % b == 0)


def kernel_segment_ids(valid, segment_ids=None):
    """Kernel ids ``[batch, length]`` int32 from the model's ``valid`` mask (True = real token) and
    optional packing ids: real tokens keep their example's id (0 when unpacked), padding gets
    :data:`PAD_SEGMENT`."""
    seg = jnp.zeros(valid.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    return jnp.where(valid, seg, PAD_SEGMENT)


def _kernel(heads: int, length: int, interpret: bool):
    """Built at trace time, per call (its block-mask tables become constants of the program)."""
    b = block_size(length)
    sizes = BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                       block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = MultiHeadMask([CausalMask((length, length)) for _ in range(heads)])
    return make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q, k, v, seg, interpret):
    """One device's share: ``q [b, heads, t, d]``, ``k/v [b, kv_heads, t, d]``, ``seg [b, t]``."""
    kernel = _kernel(q.shape[1], q.shape[2], interpret)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(s, s)))(q, k, v, seg)


def _pick(spec: P, i: int):
    return spec[i] if i < len(spec) else None


def splash_attention(q, k, v, segment_ids, *, scale=None, interpret: bool = False):
    """``q [batch, t, heads, d]``, ``k/v [batch, t, kv_heads, d]``, ``segment_ids [batch, t]`` (kernel
    ids, see :func:`kernel_segment_ids`) -> ``[batch, t, heads, d]``: causal softmax attention within
    each segment, scaled by ``scale`` (default ``1/sqrt(d)``)."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    if n % kv:
        raise ValueError(f"query heads ({n}) must be a multiple of key/value heads ({kv})")
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    q = q * jnp.asarray(scale, q.dtype)  # the kernel does not scale
    seg = segment_ids.astype(jnp.int32)
    pad = (-t) % LANES
    if pad:  # padded queries see only padded keys (and are dropped); real ones never see them
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=PAD_SEGMENT)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [b, heads, T, d]: the kernel's layout

    ctx = parallel.current_mesh()
    if ctx is None or ctx[0].size == 1:
        out = _local(q, k, v, seg, interpret)
    else:
        mesh, rules = ctx
        q_spec = parallel.logical_to_spec(("batch", "act_heads", None, None), q.shape, mesh, rules)
        kv_spec = parallel.logical_to_spec(("batch", "act_kv_heads", None, None), k.shape, mesh, rules)
        if _pick(q_spec, 1) != _pick(kv_spec, 1) and kv != n:  # heads split unlike kv heads: one kv per head
            k, v = jnp.repeat(k, n // kv, axis=1), jnp.repeat(v, n // kv, axis=1)
            kv_spec = q_spec
        seg_spec = P(_pick(q_spec, 0))
        out = jax.shard_map(functools.partial(_local, interpret=interpret), mesh=mesh,
                            in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                            check_vma=False)(q, k, v, seg)
    return jnp.swapaxes(out, 1, 2)[:, :t]
