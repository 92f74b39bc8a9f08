"""The splice: tower rows put in place of the ``<image>`` / ``<audio>`` positions of the text embeddings.

``src`` indexes the towers' outputs as *global* flat rows (``vita_jax.data.batch.build``): tiles end to end
(``tokens_per_tile`` rows each), then the clip groups end to end (each ``[slots, T'', embed]``, its slots'
rows in slot order). :func:`splice_global` gathers by those indices; on a mesh that shards the batch, XLA
then all-gathers every chip's tower rows for every chip (traffic and memory growing with the chips).

When every row's media sit in its own batch shard's block of the tile and slot arrays (the data pipeline
lays batches out so, :func:`vita_jax.data.shards.media_local`), :func:`splice_local` gathers inside a
``shard_map`` over the batch axes: each chip takes from its own tower rows with shard-local indices
(:func:`local_src`) and nothing crosses chips. The train step chooses per batch layout
(:func:`vita_jax.parallel.use_local_media`); both give the same values.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vita_jax import parallel

TEXT, IMAGE, AUDIO, PAD = 0, 1, 2, -1  # what a spliced position holds (re-exported by models/vita.py)


def _flat(blocks: Sequence[jax.Array]) -> Optional[jax.Array]:
    """``[n, rows, embed]`` blocks -> their rows end to end ``[sum n * rows, embed]`` (None: no block)."""
    rows = [b.reshape(-1, b.shape[-1]) for b in blocks if b is not None and b.shape[0]]
    return jnp.concatenate(rows) if len(rows) > 1 else (rows[0] if rows else None)


def _put(x, kind, src, k, rows):
    if rows is None:
        return x
    return jnp.where((kind == k)[..., None], jnp.take(rows.astype(x.dtype), src, axis=0, mode="clip"), x)


def splice_global(x, kind, src, image_blocks: Sequence = (), audio_blocks: Sequence = ()):
    """``x [B, L, E]`` text embeddings with the tower rows of ``src`` (global indices) in place; PAD zero.
    ``image_blocks``: ``[tiles, tokens_per_tile, E]`` (one or none); ``audio_blocks``: one ``[slots, T'', E]``
    per clip group."""
    x = _put(x, kind, src, IMAGE, _flat(image_blocks))
    x = _put(x, kind, src, AUDIO, _flat(audio_blocks))
    return jnp.where((kind == PAD)[..., None], 0.0, x)


def local_src(src, kind, shard, n: int, blocks_of_kind: Sequence[tuple[int, int]], k: int):
    """Global flat row indices of ``kind == k`` positions -> indices into this shard's own rows.

    ``blocks_of_kind``: ``(slots, rows per slot)`` of each array of that kind, in their global order (tiles:
    one; clips: one per group); each array's slots split evenly over ``n`` shards, shard ``s`` holding slots
    ``s * slots / n ...``. Globally the arrays lie end to end; locally, this shard's part of each does."""
    out = jnp.zeros_like(src)
    base = local_base = 0
    for slots, per in blocks_of_kind:
        size, local = slots * per, (slots // n) * per
        inside = (src >= base) & (src < base + size)
        out = jnp.where(inside, src - base - shard * local + local_base, out)
        base, local_base = base + size, local_base + local
    return jnp.where(kind == k, out, 0)


def _batch_axes():
    mesh, rules = parallel.current_mesh()
    return tuple(a for a in parallel.mesh_axes_of("batch", rules) if mesh.shape.get(a, 1) > 1)


def _shards() -> int:
    return parallel.data_parallel_size(*parallel.current_mesh())


def can_splice_locally(x, image_blocks: Sequence, audio_blocks: Sequence) -> bool:
    """A mesh is active, the step said its batch lays media out per shard, and every batch / slot dimension
    divides over the batch shards."""
    if not parallel.local_media() or parallel.current_mesh() is None:
        return False
    n = _shards()
    dims = [x.shape[0]] + [b.shape[0] for b in (*image_blocks, *audio_blocks) if b is not None]
    return n > 1 and all(d % n == 0 for d in dims)


def splice_local(x, kind, src, image_blocks: Sequence = (), audio_blocks: Sequence = ()):
    """:func:`splice_global`'s values with each batch shard gathering from its own tower rows only (a
    ``shard_map`` over the mesh's batch axes; see the module docstring for the layout it needs)."""
    mesh, _ = parallel.current_mesh()
    axes, n = _batch_axes(), _shards()
    image_blocks = [b for b in image_blocks if b is not None and b.shape[0]]
    audio_blocks = [b for b in audio_blocks if b is not None and b.shape[0]]
    img_layout = [(b.shape[0], b.shape[1]) for b in image_blocks]
    aud_layout = [(b.shape[0], b.shape[1]) for b in audio_blocks]

    def body(x, kind, src, imgs, auds):
        s = jnp.zeros((), src.dtype)
        for a in axes:  # the shard's index over the batch axes, major to minor (the PartitionSpec's order)
            s = s * mesh.shape[a] + jax.lax.axis_index(a).astype(src.dtype)
        x = _put(x, kind, local_src(src, kind, s, n, img_layout, IMAGE), IMAGE, _flat(imgs))
        x = _put(x, kind, local_src(src, kind, s, n, aud_layout, AUDIO), AUDIO, _flat(auds))
        return jnp.where((kind == PAD)[..., None], 0.0, x)

    spec = P(axes)
    blocks_spec = lambda bs: [spec] * len(bs)  # noqa: E731
    f = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, blocks_spec(image_blocks),
                                                 blocks_spec(audio_blocks)),
                      out_specs=spec, axis_names=set(axes), check_vma=False)
    return f(x, kind, src, image_blocks, audio_blocks)
