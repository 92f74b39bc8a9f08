"""Memory-lean attention for masks that are a rule of positions, not an array: query blocks in a scan.

The speech decoder's training forward (stage 3.2) attends over ``T = 1 + 4·n_text + n_codes + 1``
positions with a prefix-LM mask (bidirectional text, causal speech that sees the text). Dense, its
scores and probabilities are ``[B, heads, T, T]`` float32 per layer, kept for the backward: at 1024
text tokens (T = 6146) about 2 GiB per layer and row, and the boolean mask ``[B, 1, T, T]`` beside
them. Here the mask is :class:`PrefixLMMask`, three ``O(B)`` arrays; :func:`chunked_attention` runs
the queries ``chunk`` at a time in a ``lax.scan``, each block's mask built from iotas, each block
under ``jax.checkpoint`` (the backward recomputes a block's scores instead of keeping all of them), so
the largest value is ``[B, heads, chunk, T]``. The FLOPs are the dense ones (every key of every block
is scored); the numbers equal the dense path's: a fully masked row gets the same uniform average as
``jax.nn.dot_product_attention`` gives it (its output is never read by a valid row).

Any backend (plain XLA). Splash / tokamax take segment ids or one key interval per query; this mask
has two intervals for a speech row (the text, then the speech up to itself).
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

CHUNK = 512

# what jax.nn.dot_product_attention's XLA path fills masked scores with (-0.7 x the float32 max: finite, so a
# row with no visible key becomes a uniform average instead of NaN); the same here, so the paths agree there too
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


@flax.struct.dataclass
class PrefixLMMask:
    """Key ``c`` is visible to query ``r`` (both positions of the whole sequence) when

    * both are text: ``r < text_len`` and ``c < text_len`` (bidirectional), or
    * ``r`` is speech (``speech_start <= r < speech_end``) and ``c`` is text (``c < text_len``), or
    * both are speech and ``c <= r`` (causal).

    ``text_len [B]``, ``speech_end [B]`` int32; ``speech_start`` a scalar (the padded text length).
    Rows ``text_len <= r < speech_start`` (text padding) and ``r >= speech_end`` see nothing.
    ``speech_end = speech_start`` gives the NAR stack's padding mask (text only). ``chunk``: the query
    block of :func:`chunked_attention` (static)."""
    text_len: jax.Array
    speech_start: jax.Array
    speech_end: jax.Array
    chunk: int = flax.struct.field(pytree_node=False, default=CHUNK)

    def block(self, rows, cols):
        """Boolean ``[B, len(rows), len(cols)]`` for position vectors ``rows``, ``cols``."""
        r, c = rows[None, :, None], cols[None, None, :]
        tl, ss, se = self.text_len[:, None, None], self.speech_start, self.speech_end[:, None, None]
        text_c = c < tl
        speech_r = (r >= ss) & (r < se)
        return (text_c & (r < tl)) | (speech_r & text_c) | (speech_r & (c >= ss) & (c < se) & (c <= r))

    def dense(self, length: int):
        """The same mask as a boolean ``[B, 1, length, length]`` array (the XLA path's input)."""
        pos = jnp.arange(length)
        return self.block(pos, pos)[:, None]


def _block(q, k, v, mask, scale):
    """``q [B, C, H, D]`` against all keys ``k, v [B, T, H, D]``; ``mask [B, C, T]``."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask[:, None], s, _MASKED)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def chunked_attention(q, k, v, mask: PrefixLMMask, *, chunk=None, scale=None):
    """``q [B, Q, H, D]``, ``k, v [B, T, KH, D]`` (``H`` a multiple of ``KH``) -> ``[B, Q, H, D]``.

    Queries are positions ``0 .. Q-1`` and keys ``0 .. T-1`` of the same sequence (no cache). Rows are
    padded up to a multiple of ``chunk`` (default ``mask.chunk``; pad rows see nothing and are dropped)."""
    b, n, h, d = q.shape
    if k.shape[2] != h:  # grouped-query: each kv head serves h / kh query heads
        k, v = (jnp.repeat(t, h // k.shape[2], axis=2) for t in (k, v))
    scale = d ** -0.5 if scale is None else scale
    c = min(chunk or mask.chunk, n)
    blocks = -(-n // c)
    qp = jnp.pad(q, ((0, 0), (0, blocks * c - n), (0, 0), (0, 0)))
    qb = qp.reshape(b, blocks, c, h, d).swapaxes(0, 1)  # [blocks, B, C, H, D]
    cols = jnp.arange(k.shape[1])

    @jax.checkpoint
    def one(qi, i):
        return _block(qi, k, v, mask.block(i * c + jnp.arange(c), cols), scale)

    def body(carry, xs):
        return carry, one(*xs)

    _, out = jax.lax.scan(body, None, (qb, jnp.arange(blocks)))
    return out.swapaxes(0, 1).reshape(b, blocks * c, h, d)[:, :n]
