"""The causal-LM loss over position chunks: cross-entropy, target counts and argmax hits without
ever holding the whole ``[rows, L, vocab]`` logits (nor their gradient).

The model hands over its final hidden states ``[rows, L, embed]`` and its LM head (``lm_head`` or
the tied embedding); the sequence is cut into chunks of ``chunk`` positions and each chunk's logits
``[rows, chunk, vocab]`` are made, reduced to three numbers per row and dropped, one chunk after
another (``jax.lax.map``). Each chunk is a ``jax.checkpoint``: the backward pass recomputes that
chunk's logits instead of keeping them, so forward and backward both peak at one chunk's logits.
This is MaxText's vocabulary tiling (there over tokens, here over positions of each row, so the
batch axis keeps its sharding). tokamax's ``linear_softmax_cross_entropy_loss`` was considered: off
TPU it materialises the full logits, and it knows no ignore index, per-row sums nor argmax.

Per position the arithmetic is the dense loss's own (``log_softmax`` over the full vocabulary in
float32, the first maximal index for the argmax), so results equal the dense ones up to the order
of the final sums.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from vita_jax.sizes import ceil_div


def _chunk_terms(logits, targets, ignore_index: int):
    """``logits [rows, c, vocab]`` (any float dtype), ``targets [rows, c]`` -> per row
    ``(sum of CE in float32, count, argmax hits)`` over the targets that are not ``ignore_index``."""
    valid = targets != ignore_index
    safe = jnp.where(valid, targets, 0)
    hits = (jnp.argmax(logits, -1) == safe) & valid
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return (jnp.sum(jnp.where(valid, nll, 0.0), 1), jnp.sum(valid, 1, dtype=jnp.int32),
            jnp.sum(hits, 1, dtype=jnp.int32))


def row_terms(hidden, labels, head: Optional[Callable] = None, chunk: int = 0, ignore_index: int = -100):
    """Per row ``(sum of CE [rows] float32, targets [rows] int32, argmax hits [rows] int32)`` of
    position ``t`` predicting ``labels[:, t + 1]`` (the official shift), targets ``!= ignore_index``.

    ``hidden [rows, L, embed]``: final hidden states, ``head``: ``[rows, c, embed] -> [rows, c, vocab]``
    logits (None: ``hidden`` already holds logits ``[rows, L, vocab]``). ``chunk``: positions per
    chunk (<= 0: all ``L - 1`` at once); the sequence is padded with ignored targets to a multiple."""
    head = head or (lambda h: h)
    h, tgt = hidden[:, :-1], labels[:, 1:]
    rows, n = tgt.shape
    c = n if chunk <= 0 else min(int(chunk), n)
    k = ceil_div(n, c)
    if k == 1:  # one chunk: no loop (nothing to save, and XLA:CPU runs a backward inside a loop slower)
        return _chunk_terms(head(h), tgt, ignore_index)
    pad = k * c - n
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    tgt = jnp.pad(tgt, ((0, 0), (0, pad)), constant_values=ignore_index)
    hs = jnp.swapaxes(h.reshape(rows, k, c, h.shape[-1]), 0, 1)    # [k, rows, c, embed]
    ts = jnp.swapaxes(tgt.reshape(rows, k, c), 0, 1)               # [k, rows, c]

    # prevent_cse=False: inside a loop CSE cannot merge the recomputation away (the jax.checkpoint docs)
    one = jax.checkpoint(lambda a: _chunk_terms(head(a[0]), a[1], ignore_index), prevent_cse=False)
    nll, count, hits = jax.lax.map(one, (hs, ts))
    return nll.sum(0), count.sum(0), hits.sum(0)


def loss_terms(hidden, labels, head: Optional[Callable] = None, chunk: int = 0, ignore_index: int = -100):
    """:func:`row_terms` summed over rows: ``(sum CE, (targets, argmax hits))`` scalars."""
    nll, count, hits = row_terms(hidden, labels, head, chunk, ignore_index)
    return jnp.sum(nll), (jnp.sum(count), jnp.sum(hits))
