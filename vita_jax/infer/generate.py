"""Prefill into an explicit KV cache, then one jitted decode step per token.

Prompts may be padded on either side (``attention_mask`` 1 = real token): rotary positions count
real tokens only and padded slots are masked as keys, so each row decodes exactly as it would
alone. Sampling: greedy, or temperature / top-k / top-p from a PRNG key.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vita_jax.models.qwen2 import KVCache, Qwen2Config

MAX_NEW_TOKENS = 32768  # Qwen2.5's context (max_position_embeddings): the KV cache of a longer reply would not fit


def check_sampling(max_new_tokens=1, do_sample: bool = False, temperature=1.0, top_k=0, top_p=1.0) -> None:
    """Raises ``ValueError`` naming the field when a sampling setting cannot work: ``max_new_tokens``
    in 1..:data:`MAX_NEW_TOKENS`, ``top_k`` >= 0 (0 = off), ``top_p`` in (0, 1] (1 = off), ``temperature``
    > 0 when sampling."""
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or \
            not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS} (the LLM's context), "
                         f"got {max_new_tokens!r}")
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not (isinstance(top_p, (int, float, np.number)) and 0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if not isinstance(temperature, (int, float, np.number)) or not np.isfinite(float(temperature)) or (
            do_sample and float(temperature) <= 0.0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")


def sample_logits(logits, key, do_sample: bool, temperature, top_k: int, top_p):
    """``logits [batch, vocab]`` (float32) -> ids ``[batch]``. Greedy picks the first maximum."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k and 0 < top_k < logits.shape[-1]:  # k >= the vocabulary keeps every token: no filter
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # drop a token when the mass before it already reaches top_p (the top token always stays)
    drop_sorted = (jnp.cumsum(probs, axis=-1) - probs) >= top_p
    drop_sorted = drop_sorted.at[:, 0].set(False)  # never every token (top_p <= 0 would sample id 0)
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _mask_vocab(logits, vocab_limit):
    if vocab_limit is None or vocab_limit >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("module", "do_sample", "top_k", "vocab_limit"))
def prefill(module, params, input_ids, attention_mask, cache, key, *, do_sample, temperature, top_k,
            top_p, vocab_limit, inputs_embeds=None):
    """Runs the prompt through the model into ``cache``; returns ``(first new ids [batch], cache)``."""
    mask = attention_mask.astype(jnp.int32)
    # the last real token of each row (works for left and right padding)
    last = mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    kwargs = dict(inputs_embeds=inputs_embeds) if inputs_embeds is not None else dict(input_ids=input_ids)
    logits, cache = module.apply({"params": params}, attention_mask=mask, cache=cache, logits_index=last,
                                 **kwargs)
    logits = _mask_vocab(logits[:, 0].astype(jnp.float32), vocab_limit)
    return sample_logits(logits, key, do_sample, temperature, top_k, top_p), cache, logits


@functools.partial(jax.jit, static_argnames=("module", "do_sample", "top_k", "vocab_limit"),
                   donate_argnames=("cache",))
def decode_step(module, params, tokens, cache, key, *, do_sample, temperature, top_k, top_p, vocab_limit):
    """One token per row: ``tokens [batch]`` -> ``(next ids [batch], cache, logits [batch, vocab])``."""
    ones = jnp.ones((tokens.shape[0], 1), jnp.int32)
    logits, cache = module.apply({"params": params}, input_ids=tokens[:, None], attention_mask=ones,
                                 cache=cache, logits_index=jnp.zeros(tokens.shape[0], jnp.int32))
    logits = _mask_vocab(logits[:, 0].astype(jnp.float32), vocab_limit)
    return sample_logits(logits, key, do_sample, temperature, top_k, top_p), cache, logits


def generate(module, params, cfg: Qwen2Config, input_ids, attention_mask=None, *, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, stop_ids: Optional[Sequence[int]] = None, vocab_limit: Optional[int] = None,
             pad_id: int = -1, inputs_embeds=None, return_scores: bool = False):
    """``input_ids [batch, length]`` -> new ids ``[batch, n <= max_new_tokens]`` (numpy int32).

    A row stops after emitting one of ``stop_ids`` (kept in its output); later positions hold
    ``pad_id``. Decoding ends early when every row has stopped. With ``return_scores`` also returns
    the float32 next-token logits ``[n, batch, vocab]`` of each step."""
    check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
    ids = None if input_ids is None else jnp.asarray(input_ids, jnp.int32)
    b, t = ids.shape[:2] if inputs_embeds is None else inputs_embeds.shape[:2]
    mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    cache = KVCache.init(cfg, b, t + max_new_tokens)
    key = jax.random.PRNGKey(seed)
    static = dict(do_sample=do_sample, top_k=int(top_k), vocab_limit=vocab_limit)
    dyn = dict(temperature=jnp.float32(temperature), top_p=jnp.float32(top_p))
    key, sub = jax.random.split(key)
    tok, cache, logits = prefill(module, params, ids, mask, cache, sub, inputs_embeds=inputs_embeds,
                                 **static, **dyn)
    stops = np.asarray(list(stop_ids or []), np.int32)
    out, scores = [], []
    done = np.zeros(b, bool)
    for step in range(max_new_tokens):
        tok_np = np.asarray(tok)
        out.append(np.where(done, pad_id, tok_np))
        if return_scores:
            scores.append(np.asarray(logits))
        done |= np.isin(tok_np, stops)
        if done.all() or step == max_new_tokens - 1:
            break
        key, sub = jax.random.split(key)
        tok, cache, logits = decode_step(module, params, tok, cache, sub, **static, **dyn)
    ids_out = np.stack(out, axis=1).astype(np.int32)
    return (ids_out, np.stack(scores)) if return_scores else ids_out


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "do_sample", "top_k", "vocab_limit"))
def decode_loop(module, params, first, cache, key, stop_ids, *, max_new_tokens, do_sample, temperature, top_k,
                top_p, vocab_limit, pad_id=-1):
    """Decodes on the device until every row has stopped or ``max_new_tokens`` ids are out (one
    ``lax.while_loop``, no host round trip per token). ``first [batch]``: the prefill's ids ->
    ``(ids [batch, max_new_tokens] with pad_id after a row's stop id, number of steps run)``."""
    b = first.shape[0]
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    ones = jnp.ones((b, 1), jnp.int32)
    zeros = jnp.zeros(b, jnp.int32)

    def cond(s):
        return (s[0] < max_new_tokens) & ~s[4].all()

    def body(s):
        step, tok, cache, out, done, key = s
        key, sub = jax.random.split(key)
        logits, cache = module.apply({"params": params}, input_ids=tok[:, None], attention_mask=ones, cache=cache,
                                     logits_index=zeros)
        logits = _mask_vocab(logits[:, 0].astype(jnp.float32), vocab_limit)
        nxt = sample_logits(logits, sub, do_sample, temperature, top_k, top_p)
        out = jax.lax.dynamic_update_slice(out, jnp.where(done, pad_id, nxt)[:, None], (0, step))
        # a stopped row keeps decoding (static shapes) on a valid id; its output is padding
        return step + 1, jnp.where(done, 0, nxt), cache, out, done | jnp.isin(nxt, stop_ids), key

    init = (jnp.int32(1), first, cache, out, jnp.isin(first, stop_ids), key)
    step, _, _, out, _, _ = jax.lax.while_loop(cond, body, init)
    return out, step


def generate_device(module, params, cfg: Qwen2Config, attention_mask, inputs_embeds=None, input_ids=None, *,
                    max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, seed: int = 0, stop_ids: Sequence[int] = (), vocab_limit: Optional[int] = None,
                    pad_id: int = -1):
    """:func:`generate` with the decode loop on the device (:func:`decode_loop`): one jitted prefill,
    one jitted loop. Returns the device array of new ids ``[batch, max_new_tokens]`` (``pad_id``
    after each row's stop id, and in the columns past the last step)."""
    check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
    b, t = (inputs_embeds if inputs_embeds is not None else input_ids).shape[:2]
    cache = KVCache.init(cfg, b, t + max_new_tokens)
    key, sub = jax.random.split(jax.random.PRNGKey(seed))
    static = dict(do_sample=do_sample, top_k=int(top_k), vocab_limit=vocab_limit)
    dyn = dict(temperature=jnp.float32(temperature), top_p=jnp.float32(top_p))
    ids = None if input_ids is None else jnp.asarray(input_ids, jnp.int32)
    tok, cache, _ = prefill(module, params, ids, jnp.asarray(attention_mask, jnp.int32), cache, sub,
                            inputs_embeds=inputs_embeds, **static, **dyn)
    stops = jnp.asarray(list(stop_ids) or [-2], jnp.int32)
    out, _ = decode_loop(module, params, tok, cache, key, stops, max_new_tokens=int(max_new_tokens), pad_id=pad_id,
                         **static, **dyn)
    return out
