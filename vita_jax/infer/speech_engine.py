"""Speech-code generation as an engine: the decoder rows of several replies in one fixed batch of slots,
sampled on the device, several codes per dispatch.

:meth:`SpeechModel.iter_codes <vita_jax.infer.speech.SpeechModel.iter_codes>` is the official decoder
(one jitted step per code, the distribution built and sampled on the host): the reference. Here the same
rule runs on the device for ``slots`` rows at once:

- a row joins by a prefill of its decoder input (``[n, idim]``, padded up a fixed ladder of lengths) into
  its slot's rows of a shared KV cache ``[blocks, slots, cache_len, heads, head_dim]``; joining or leaving
  never changes a shape, so nothing compiles after :meth:`DecodeSlots.warmup`;
- one dispatch runs up to ``steps`` AR steps for every slot in a ``lax.while_loop`` (each row at its own
  cache position), applies the official repetition penalty (a window over ``[SOS] + codes``, a duplicate
  divides again), softmax, top-k, and draws the code; a row stops at EOS (not emitted) or at its
  ``max_tokens``; the loop ends early once no row is active;
- greedy rows (``top_k = 1``) give :meth:`generate_codes`' ids; a sampled row draws its ``t``-th code with
  ``fold_in(PRNGKey(seed), t)``, so a seed gives the same codes whatever shares the batch and however the
  steps are split into dispatches.

:class:`~vita_jax.infer.speech_scheduler.SpeechScheduler` runs this for the live server's sessions.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vita_jax import parallel
from vita_jax.models import tts_decoder as dec
from vita_jax.sizes import round_up, rung

LADDER = (32, 64, 128, 256, 512, 1024)  # decoder-input lengths a prefill compiles for (rows, padded up)


@dataclasses.dataclass(frozen=True)
class SlotOptions:
    """One row's sampling: ``top_k`` (1 = greedy), ``seed``, ``max_tokens`` (codes, EOS excluded),
    ``penalty_window`` (<= 0: no penalty) and ``penalty`` (the official divisor, 1.1)."""
    top_k: int = 2
    seed: int = 0
    max_tokens: int = 1000
    penalty_window: int = -1
    penalty: float = 1.1


class DecodeSlots:
    """The device side: ``state`` (a dict of arrays, see :meth:`_empty`), :meth:`join`, :meth:`leave`
    and :meth:`decode`. Not thread-safe: one caller (the scheduler's thread) drives it.

    ``max_input``: the longest decoder input (rows) a slot takes; ``max_tokens``: the most codes a row
    may produce; ``window``: the longest repetition-penalty window; ``steps``: AR steps per dispatch."""

    def __init__(self, speech, slots: int = 4, steps: int = 8, max_input: int = 1024, max_tokens: int = 1000,
                 window: int = 16):
        c = speech.decoder_cfg
        self.cfg, self.params, self.slots, self.steps, self.window = c, speech.decoder_params, slots, steps, window
        self.max_tokens = max_tokens
        self.ladder = tuple(n for n in LADDER if n < max_input) + (round_up(max_input, 32),)
        self.cache_len = round_up(self.ladder[-1] + 2 + max_tokens, 64)
        m = dec.TTSDecoder(c)
        self.state = parallel.commit_like(self._empty(), self.params)  # else each join length compiles twice

        def prefill(p, x, n):
            shape = (c.num_blocks, 1, self.cache_len, c.attention_heads, c.idim // c.attention_heads)
            k0 = jnp.zeros(shape, c.dtype)
            return m.apply({"params": p}, x, k0, k0, n, method=dec.TTSDecoder.prefill)

        def step_row(p, token, index, k, v):  # one row at its own cache position: vmapped over the slots
            logits, k, v = m.apply({"params": p}, token[None], index, k[:, None], v[:, None],
                                   method=dec.TTSDecoder.step)
            return logits[0], k[:, 0], v[:, 0]

        self._step_rows = jax.vmap(step_row, in_axes=(None, 0, 0, 1, 1), out_axes=(0, 1, 1))
        self._prefill = prefill
        self._join = jax.jit(self._join_fn, donate_argnums=(1,))
        self._leave = jax.jit(self._leave_fn, donate_argnums=(0,))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))

    # ------------------------------------------------------------------ state
    def _empty(self) -> dict:
        c, s = self.cfg, self.slots
        shape = (c.num_blocks, s, self.cache_len, c.attention_heads, c.idim // c.attention_heads)
        i32 = lambda v: jnp.full((s,), v, jnp.int32)  # noqa: E731
        return dict(k=jnp.zeros(shape, c.dtype), v=jnp.zeros(shape, c.dtype), token=i32(c.sos), index=i32(0),
                    produced=i32(0), limit=i32(0), active=jnp.zeros((s,), bool), top_k=i32(1), window=i32(0),
                    penalty=jnp.ones((s,), jnp.float32), key=jnp.zeros((s, 2), jnp.uint32),
                    hist=jnp.full((s, self.window), -1, jnp.int32))

    def _join_fn(self, p, state, slot, x, n, top_k, window, penalty, seed, limit):
        k, v = self._prefill(p, x, n)
        put = lambda a, row: jax.lax.dynamic_update_index_in_dim(a, row, slot, 0)  # noqa: E731
        hist = jnp.full((self.window,), -1, jnp.int32).at[-1].set(self.cfg.sos)  # history = [SOS]
        new = dict(state)
        new["k"] = jax.lax.dynamic_update_index_in_dim(state["k"], k[:, 0], slot, 1)
        new["v"] = jax.lax.dynamic_update_index_in_dim(state["v"], v[:, 0], slot, 1)
        for name, val in (("token", self.cfg.sos), ("index", n + 1), ("produced", 0), ("limit", limit),
                          ("active", limit > 0), ("top_k", top_k), ("window", window), ("penalty", penalty),
                          ("key", jax.random.PRNGKey(seed)), ("hist", hist)):
            new[name] = put(state[name], jnp.asarray(val, state[name].dtype))
        return new

    def _leave_fn(self, state, slot):
        return dict(state, active=state["active"].at[slot].set(False))

    # ------------------------------------------------------------------ one dispatch
    def _distribution(self, state, logits):
        """The official rule per row (:func:`~vita_jax.models.tts_decoder.sampling_distribution`):
        ``logits [S, V+4]`` -> probabilities ``[S, V+4]`` (top-k kept, renormalised)."""
        rows = jnp.arange(self.slots)
        count = state["produced"] + 1  # [SOS] + codes so far
        for j in range(self.window):  # oldest first; a token seen twice is divided twice, as upstream
            tok = state["hist"][:, j]
            valid = (self.window - j <= jnp.minimum(state["window"], count)) & (tok >= 0)
            t = jnp.maximum(tok, 0)
            cur = logits[rows, t]
            logits = logits.at[rows, t].set(jnp.where(valid, cur / state["penalty"], cur))
        e = jnp.exp(logits - logits.max(-1, keepdims=True))
        probs = e / e.sum(-1, keepdims=True)
        rank = jnp.argsort(jnp.argsort(-probs, axis=-1, stable=True), axis=-1, stable=True)
        kept = jnp.where(rank < state["top_k"][:, None], probs, 0.0)
        return kept / kept.sum(-1, keepdims=True)

    def _one_step(self, p, state):
        c = self.cfg
        logits, k, v = self._step_rows(p, state["token"], state["index"], state["k"], state["v"])
        probs = self._distribution(state, logits.astype(jnp.float32))
        keys = jax.vmap(jax.random.fold_in)(state["key"], state["produced"])
        drawn = jax.vmap(lambda kk, pr: jax.random.categorical(kk, jnp.log(pr)))(keys, probs)
        token = jnp.where(state["top_k"] == 1, jnp.argmax(probs, -1), drawn).astype(jnp.int32)
        act = state["active"]
        emit = act & (token != c.eos)
        produced = state["produced"] + emit
        upd = lambda new, old: jnp.where(act.reshape((1, -1) + (1,) * (old.ndim - 2)), new, old)  # noqa: E731
        hist = jnp.where(emit[:, None], jnp.concatenate([state["hist"][:, 1:], token[:, None]], 1), state["hist"])
        new = dict(state, k=upd(k, state["k"]), v=upd(v, state["v"]), hist=hist, produced=produced,
                   token=jnp.where(emit, token, state["token"]), index=state["index"] + emit,
                   active=emit & (produced < state["limit"]))
        return new, jnp.where(emit, token, -1)

    def _decode_fn(self, p, state):
        """Up to ``steps`` AR steps for every active slot -> ``(state, codes [S, steps])``, -1 where a
        row produced nothing (inactive, or stopped at EOS / its limit)."""
        out0 = jnp.full((self.slots, self.steps), -1, jnp.int32)

        def cond(carry):
            t, st, _ = carry
            return (t < self.steps) & st["active"].any()

        def body(carry):
            t, st, out = carry
            st, tok = self._one_step(p, st)
            return t + 1, st, jax.lax.dynamic_update_index_in_dim(out, tok, t, 1)

        _, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out0))
        return state, out

    # ------------------------------------------------------------------ host API
    def bucket(self, n: int) -> int:
        b = rung(self.ladder, n)
        if b is not None:
            return b
        raise ValueError(f"speech decoder input of {n} rows is longer than the engine's max_input "
                         f"{self.ladder[-1]}")

    def join(self, slot: int, x, opts: SlotOptions) -> None:
        """Prefills ``x [n, idim]`` (n >= 1) into ``slot`` and arms it with ``opts``."""
        x = np.asarray(x, np.float32)
        n = x.shape[0]
        if not 0 < opts.max_tokens <= self.max_tokens:
            raise ValueError(f"max_tokens must be in 1..{self.max_tokens}, got {opts.max_tokens}")
        if opts.penalty_window > self.window:
            raise ValueError(f"penalty_window {opts.penalty_window} is over the engine's window {self.window}")
        xp = np.zeros((1, self.bucket(n), x.shape[1]), np.float32)
        xp[0, :n] = x
        self.state = self._join(self.params, self.state, jnp.int32(slot), jnp.asarray(xp, self.cfg.dtype),
                                jnp.int32(n), jnp.int32(max(1, opts.top_k)), jnp.int32(max(0, opts.penalty_window)),
                                jnp.float32(opts.penalty), jnp.uint32(opts.seed), jnp.int32(opts.max_tokens))

    def leave(self, slot: int) -> None:
        self.state = self._leave(self.state, jnp.int32(slot))

    def decode(self) -> tuple[np.ndarray, np.ndarray]:
        """One dispatch -> ``(codes [S, steps] (-1: none), active [S])`` on the host."""
        self.state, out = self._decode(self.params, self.state)
        codes, active = jax.device_get((out, self.state["active"]))
        return np.asarray(codes), np.asarray(active)

    def warmup(self) -> None:
        """Compiles every program a session can need (a prefill per ladder length, one dispatch, leave)."""
        for n in self.ladder:
            self.join(0, np.zeros((n, self.cfg.idim), np.float32), SlotOptions(max_tokens=1))
        self.decode()
        self.leave(0)

    def compiled(self) -> dict[str, Any]:
        """Programs compiled so far per function (a join or leave must not add any after warm-up)."""
        return {n: f._cache_size() for n, f in (("join", self._join), ("leave", self._leave),
                                                ("decode", self._decode))}
