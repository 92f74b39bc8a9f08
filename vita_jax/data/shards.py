"""Media laid out per batch shard: the rule that lets the model splice on each chip alone.

On a mesh that shards the batch over ``n`` devices, each device holds ``rows / n`` rows and ``1 / n`` of the
tile slots and of each clip group's slots. When every row's ``src`` points only into its own shard's part of
those arrays, :func:`vita_jax.models.splice.splice_local` gathers without crossing chips; the collator and the
packer lay batches out so (``shards`` of :func:`vita_jax.data.pipeline.batch_layout`), and the train step
checks each batch with :func:`media_local` before choosing that splice."""
from __future__ import annotations

import numpy as np

from vita_jax.models.vita import AUDIO, IMAGE
from vita_jax.models.whale import llm_length


def media_local(batch: dict, shards: int, tokens_per_tile: int, process: tuple[int, int] = (0, 1)) -> bool:
    """Whether every row of a host batch (``[rows, L]`` or ``[micro-batches, rows, L]``) keeps its tiles and clips
    in its own batch shard's slots: rows, tile slots and each clip group's slots split evenly over ``shards``
    and row ``r``'s ``src`` only in shard ``r // (rows / shards)``'s part of each (what
    :func:`vita_jax.models.splice.splice_local` needs). ``process = (index, count)``: ``src`` indexes the global
    arrays of ``count`` processes' batches laid end to end, this one's shards numbered from ``index x shards``."""
    kind, src = np.asarray(batch["kind"]), np.asarray(batch["src"])
    feats = batch.get("audio_feats")
    groups = [] if feats is None else (list(feats) if isinstance(feats, (list, tuple)) else [feats])
    pixels = batch.get("pixels")
    if kind.ndim == 3:  # micro-batches: each on its own
        return all(media_local(dict(kind=kind[i], src=src[i], pixels=None if pixels is None else pixels[i],
                                    audio_feats=[g[i] for g in groups]), shards, tokens_per_tile, process)
                   for i in range(kind.shape[0]))
    rows, tiles = kind.shape[0], 0 if pixels is None else len(pixels)
    if shards < 1 or rows % shards or tiles % shards or any(len(g) % shards for g in groups):
        return False
    total = shards * process[1]
    shard = process[0] * shards + np.arange(rows)[:, None] // (rows // shards) + np.zeros_like(src)
    for k, layout in ((IMAGE, [(tiles // shards, tokens_per_tile)]),
                      (AUDIO, [(len(g) // shards, int(llm_length(np.shape(g)[1]))) for g in groups])):
        at = kind == k
        if not at.any():
            continue
        base, owner = 0, np.full(src.shape, -1)
        for per_shard, per in layout:  # each array: per_shard slots of every shard, the shards in order
            inside = (src >= base) & (src < base + per_shard * total * per)
            owner = np.where(inside, (src - base) // per // max(per_shard, 1), owner)
            base += per_shard * total * per
        if not np.array_equal(owner[at], shard[at]):
            return False
    return True
