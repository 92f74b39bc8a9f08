"""Causal, segment-aware flash attention on GPU (and anywhere else, slower): tokamax's kernels.

:func:`flash_attention` takes the model's ``[batch, length, heads, head_dim]`` layout and the same
kernel ``segment_ids [batch, length]`` as the splash path (:func:`vita_jax.layers.splash.kernel_segment_ids`:
one id per packed example, padding an id no real token has). Packed segments are contiguous runs, so
"causal and same segment" is "causal and the key is not before the start of the query's run":
tokamax's ``Mask(k_start=..., is_causal=True)`` with a per-query ``k_start [batch, 1, length]``, an
``O(L)`` array, not an ``[L, L]`` mask. Padding is a run of its own (it sees only padding; real
tokens never see it; no row is fully masked). This holds only while every id's positions form
**one contiguous run** (the packer's layout; right or left padding); an id that reappears after
another one would not see its earlier run.

Kernels, the first that applies (tokamax raises ``NotImplementedError`` for the others, at trace time):

* GPU: ``mosaic_gpu`` (Pallas Mosaic GPU, sm90/sm100, 16-bit inputs; forward and backward take
  ``k_start`` as an array and skip key blocks before it), then ``triton`` (Pallas Triton, any recent
  NVIDIA GPU, any float dtype; its forward takes ``k_start`` as an array, its backward expands the
  mask to a boolean ``[batch, 1, L, L]``: 1 byte per entry, no float ``L x L``), then ``xla_chunked``.
* elsewhere: ``xla_chunked`` (plain XLA, ``chunk x chunk`` float blocks; it too expands the mask to a
  boolean ``[batch, 1, L, L]``). This is what the CPU parity tests run; tokamax's Triton kernel
  has no interpreter switch (``Op.__call__`` refuses a device its ``supported_on`` rejects).

tokamax's public ``tokamax.dot_product_attention`` takes a boolean mask or sequence lengths, not
``k_start``; so the kernels are called through ``tokamax._src.ops.attention`` (pinned tokamax
version). tokamax is imported only when this path runs (``pip install -e .[gpu]``). tokamax reads its
options as absl flags, parsing ``sys.argv`` if no one has: this module marks absl's flags parsed first
(defaults; our command line is not absl's).

Rows are padded to a multiple of 128 (Mosaic GPU's query tile must divide them; tokamax raises a
``ValueError``, not a fallback, otherwise). Inside a :func:`vita_jax.parallel.use_mesh` block on more
than one device the call is wrapped in ``shard_map`` over the batch and heads axes (never the
sequence), as the splash path is.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vita_jax import parallel

GPU_KERNELS = ("mosaic_gpu", "triton", "xla_chunked")
OTHER_KERNELS = ("xla_chunked",)
CHUNK = (512, 1024)  # tokamax's own default (query, key) chunk for xla_chunked
MULTIPLE = 128  # rows are padded to a multiple of this: Mosaic GPU's query tile (2 x 64) must divide them


def segment_starts(segment_ids):
    """``[batch, t]`` ids -> ``[batch, t]`` int32: the index where each position's run of equal ids begins."""
    t = segment_ids.shape[-1]
    first = jnp.ones(segment_ids.shape[:-1] + (1,), bool)
    new = jnp.concatenate([first, segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
    return jax.lax.cummax(jnp.where(new, jnp.arange(t, dtype=jnp.int32), 0), axis=segment_ids.ndim - 1)


def default_kernels(platform: str) -> tuple:
    return GPU_KERNELS if platform == "gpu" else OTHER_KERNELS


def _implementation(name: str, chunk):
    from tokamax._src.ops.attention import api, xla_chunked  # optional dependency (extra "gpu")
    if name == "xla_chunked":
        return xla_chunked.XlaChunkedDotProductAttention(chunk_size=tuple(chunk))
    return api.IMPLEMENTATIONS.get(name)  # None when that kernel's module did not import here


def _absl_defaults():
    """tokamax reads its options as absl flags and, when nothing has parsed flags yet, parses ``sys.argv``:
    our command line (``vita-jax train --config=...``, pytest's) is not absl's, so take the defaults."""
    from absl import flags  # a dependency of tokamax (and jax's), needed only on this path
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _local(q, k, v, starts, *, scale, kernels, chunk):
    """One device's share, ``[b, t, heads, d]``; ``starts [b, t]``."""
    from tokamax._src.ops.attention import base  # optional dependency (extra "gpu")
    _absl_defaults()
    mask = base.Mask(k_start=starts[:, None, :], is_causal=True)
    errors = []
    for name in kernels:
        impl = _implementation(name, chunk)
        if impl is None:
            errors.append(f"{name}: not in this tokamax build")
            continue
        try:
            return impl(q, k, v, mask=mask, logits_scale=scale)
        except NotImplementedError as e:
            errors.append(f"{name}: {e}")
    raise NotImplementedError("no tokamax attention kernel applies: " + "; ".join(errors))


def _pick(spec: P, i: int):
    return spec[i] if i < len(spec) else None


def flash_attention(q, k, v, segment_ids, *, scale=None, kernels=None, chunk=CHUNK):
    """``q [batch, t, heads, d]``, ``k/v [batch, t, kv_heads, d]``, ``segment_ids [batch, t]`` (kernel
    ids, contiguous runs) -> ``[batch, t, heads, d]``: causal softmax attention within each run,
    scaled by ``scale`` (default ``1/sqrt(d)``). ``kernels``: tokamax implementations to try in
    order (default :func:`default_kernels` of the platform); ``chunk``: xla_chunked's (q, k) chunk."""
    n, kv = q.shape[2], k.shape[2]
    if n % kv:
        raise ValueError(f"query heads ({n}) must be a multiple of key/value heads ({kv})")
    scale = float(1.0 / np.sqrt(q.shape[-1]) if scale is None else scale)
    kernels = tuple(kernels or default_kernels(parallel.current_platform()))
    t = q.shape[1]
    starts = segment_starts(segment_ids.astype(jnp.int32))
    pad = (-t) % MULTIPLE
    if pad:  # the padded positions are one run of their own, after every real key: no one sees them
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        starts = jnp.pad(starts, ((0, 0), (0, pad)), constant_values=t)
    local = functools.partial(_local, scale=scale, kernels=kernels, chunk=chunk)
    ctx = parallel.current_mesh()
    if ctx is None or ctx[0].size == 1:
        return local(q, k, v, starts)[:, :t]
    mesh, rules = ctx
    q_spec = parallel.logical_to_spec(("batch", None, "act_heads", None), q.shape, mesh, rules)
    kv_spec = parallel.logical_to_spec(("batch", None, "act_kv_heads", None), k.shape, mesh, rules)
    if _pick(q_spec, 2) != _pick(kv_spec, 2) and kv != n:  # heads split unlike kv heads: one kv per head
        k, v = jnp.repeat(k, n // kv, axis=2), jnp.repeat(v, n // kv, axis=2)
        kv_spec = q_spec
    out = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, P(_pick(q_spec, 0))),
                        out_specs=q_spec, check_vma=False)(q, k, v, starts)
    return out[:, :t]
