"""The LLM side of the live server: one model copy, a fixed batch of decode slots, one thread.

Every concurrent turn holds one row ("slot") of a KV cache ``[layers, slots, S, kv_heads, head_dim]``
whose write index is per row (:class:`vita_jax.models.qwen2.KVCache` with ``index [slots]``). A turn
joins by a batch-1 prefill into a cache of the same ``S`` that is copied into a free row; one
jitted :func:`vita_jax.infer.generate.decode_step` then advances every row at once, so a turn joins
and leaves without a recompilation (shapes never change; a free row decodes garbage that nobody
reads). Cancellation (barge-in) is seen between two decode steps: the row is freed before the next.

The loop never waits on the host between steps: step k+1 is dispatched with step k's sampled ids still on the
device (a row admitted meanwhile takes its prefill id from the host instead), and only then are step k's ids
copied to the host and delivered, while the device computes step k+1. A row that ended at step k has one more
id computed for it at k+1, which nobody reads (the owner of each row is recorded at dispatch).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from vita_jax import parallel
from vita_jax.infer import generate as gen
from vita_jax.infer.speech import warm_embedding_rows
from vita_jax.infer.speech_scheduler import SpeechScheduler
from vita_jax.models.qwen2 import KVCache
from vita_jax.serve.prompt import PromptShapes
from vita_jax.sizes import round_up

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class Request:
    """One turn for the LLM. ``build()`` -> ``(input_ids [L], pixels or None, fbank clips list)``
    runs on a preparation thread; ``on_token(id)`` gets each new id (stop ids excluded), ``on_done(reason,
    info)`` once at the end: reason ``"stop"``, ``"length"``, ``"cancelled"`` or ``"error"`` (``info``
    then holds ``message``), ``info`` also ``tokens``, ``prefill_ms``, ``queue_ms``, ``decode_s``."""
    build: Callable[[], tuple]
    on_token: Callable[[int], None]
    on_done: Callable[[str, dict], None]
    max_new_tokens: int = 128
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    tokens: int = 0
    info: dict = dataclasses.field(default_factory=dict)
    prepared: Any = None  # (embeds, mask) or the exception preparing them raised (a worker thread's work)


def _insert(slots: KVCache, row: KVCache, r):
    """Copies the batch-1 cache ``row`` (scalar index) into row ``r`` of ``slots`` (per-row index)."""
    return KVCache(slots.k.at[:, r].set(row.k[:, 0]), slots.v.at[:, r].set(row.v[:, 0]),
                   slots.valid.at[r].set(row.valid[0]), slots.index.at[r].set(row.index),
                   slots.next_pos.at[r].set(row.next_pos[0]))


class ServeEngine:
    """Runs the LLM of ``model`` (a :class:`vita_jax.api.VitaModel`) for up to ``slots`` concurrent
    turns. ``max_prompt`` (spliced positions, default ``min(tokenizer_model_max_length, 2048)``) and
    ``max_new_tokens`` fix the cache length ``S``; ``max_tiles``: image tiles a prompt may hold (default what
    ``chat_inputs`` gives one image: ``image.max_dynamic_patch`` and the thumbnail); sampling is greedy unless
    ``do_sample``."""

    def __init__(self, model, slots: int = 4, max_new_tokens: int = 128, max_prompt: Optional[int] = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0, speech_max_tokens: int = 500, speech_steps: int = 10, max_tiles: Optional[int] = None):
        gen.check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
        if slots < 1:
            raise ValueError(f"slots (--max-sessions) must be >= 1, got {slots}")
        self.model, self.n = model, int(slots)
        self.max_new_tokens = int(max_new_tokens)
        self.speech = None
        if model.speech is not None:  # replies of any length reuse a few speech compilations (infer/speech.py)
            model.speech.x_bucket, model.speech.codes_bucket = 32, 10
            # every session's speech-decoder rows in one batch of slots on the device; a text piece is at
            # most the reply (4 decoder rows a token)
            self.speech = SpeechScheduler(model.speech, slots=self.n, steps=speech_steps,
                                          max_input=4 * self.max_new_tokens, max_tokens=speech_max_tokens)
        # a prompt's embeddings from a fixed ladder of shapes (serve/prompt.py): nothing compiles after warm_prompts()
        if max_tiles is None:
            max_tiles = model.prep.max_tiles + int(model.prep.use_thumbnail and model.prep.max_tiles > 1)
        self.prompts = PromptShapes(model, int(max_prompt or min(int(model.config.tokenizer_model_max_length), 2048)),
                                    int(max_tiles))
        self.max_prompt = self.prompts.max_prompt
        self.cache_len = round_up(self.max_prompt + self.max_new_tokens, 64)
        self.static = dict(do_sample=do_sample, top_k=int(top_k),
                           vocab_limit=len(model.tokenizer) if model.tokenizer is not None else None)
        self.dyn = dict(temperature=jnp.float32(temperature), top_p=jnp.float32(top_p))
        self.stops = set(model.stop_ids)
        self.key = jax.random.PRNGKey(seed)
        self.cache = self._fresh_cache()
        self.rows: list[Optional[Request]] = [None] * self.n
        self.tokens = np.zeros(self.n, np.int32)  # rows' next input ids that come from the host (after a prefill)
        self.from_host = np.zeros(self.n, bool)
        self.used = np.zeros(self.n, np.int64)  # cache positions each row holds
        # a step's input ids [slots]: the previous step's ids (on the device), the host's where from_host; one
        # placement for both (replicated on a mesh), so neither program compiles twice
        ids_sharding = NamedSharding(model.mesh, PartitionSpec()) if model.mesh is not None else None
        self._next_inputs = jax.jit(lambda sampled, host, from_host: jnp.where(from_host, host, sampled),
                                    out_shardings=ids_sharding)
        self._no_ids = lambda: (jax.device_put(jnp.zeros(self.n, jnp.int32), ids_sharding) if ids_sharding else
                                parallel.commit_like(jnp.zeros(self.n, jnp.int32), model.params))
        self.sampled = self._no_ids()  # the last step's ids, on the device
        self.inflight = None  # (ids [slots] on the device, each row's request at dispatch): delivered one step behind
        self.pending: list[Request] = []
        self.cv = threading.Condition()
        self.closed = False
        self.stats = dict(steps=0, row_steps=0, prefills=0, step_s=0.0, prefill_s=0.0)
        self._insert = jax.jit(_insert, donate_argnums=0)
        # a turn's media, fbank, tokens and tower encodes are prepared here, beside the decode loop, which
        # then only prefills: joins no longer stall the other turns' steps
        self._prep = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vita-serve-prep")
        self.thread = threading.Thread(target=self._run, name="vita-serve-engine", daemon=True)
        self.thread.start()

    def _fresh_cache(self) -> KVCache:
        """An empty slot cache with a per-row write index, on the parameters' device (see commit_like)."""
        cache = KVCache.init(self.model.llm_cfg, self.n, self.cache_len)
        return parallel.commit_like(dataclasses.replace(cache, index=jnp.zeros((self.n,), jnp.int32)),
                                    self.model.params)

    # ------------------------------------------------------------------ public
    def submit(self, req: Request) -> None:
        with self.cv:
            if self.closed:
                raise RuntimeError("the engine is closed")
            req.submitted = time.perf_counter()
        fut = self._prep.submit(self._prepare, req)
        # a request still queued for preparation when the engine closes is cancelled with its future: it ends too
        fut.add_done_callback(lambda f: f.cancelled() and self._done(req, "cancelled"))

    def _prepare(self, req: Request) -> None:
        """On a worker thread: the prompt's spliced embeddings (or the error that refuses the turn), then
        the request joins the queue of the decode loop."""
        try:
            if not req.cancelled.is_set():
                ids, pixels, clips = req.build()
                req.prepared = self.prompts.embeds(np.asarray(ids), pixels, clips)
        except Exception as e:  # a bad prompt ends this turn only (reported by the loop, in order)
            req.prepared = e
        with self.cv:
            if self.closed:
                return self._done(req, "cancelled")
            self.pending.append(req)
            self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join(timeout=30)
        self._prep.shutdown(wait=True, cancel_futures=True)
        if self.speech is not None:
            self.speech.close()

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def warm_prompts(self) -> int:
        """Compiles the prompt path for every shape of its ladder, the LLM prefill for every prompt length and the
        reply's embedding-row lookup (before serving; the decode loop must not run a turn meanwhile). Returns the
        number of shapes."""
        key = jax.random.PRNGKey(0)

        def prefill(embeds, mask):
            cache = KVCache.init(self.model.llm_cfg, 1, self.cache_len)
            return gen.prefill(self.model.llm, self.model.params["llm"], None, mask, cache, key,
                               inputs_embeds=embeds, **self.static, **self.dyn)[0]
        n = self.prompts.warmup(prefill)
        if self.model.speech is not None:  # the reply's embedding rows for the speech decoder (any reply length)
            n += warm_embedding_rows(self.model.params["llm"]["model"]["embed_tokens"]["embedding"],
                                     2 * self.max_new_tokens + 16)
        return n

    def warmup(self, build) -> None:
        """Compiles prefill (for the prompt ``build()`` gives) and the slot step before serving."""
        done = threading.Event()
        self.submit(Request(build, lambda t: None, lambda reason, info: done.set(), max_new_tokens=2))
        done.wait()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.closed and not self.pending and self.active == 0:
                    self.cv.wait()
                if self.closed:
                    break
                free = self.n - self.active
                admit, self.pending = self.pending[:free], self.pending[free:]
            for r, req in enumerate(self.rows):
                if req is not None and req.cancelled.is_set():
                    self._finish(r, "cancelled")
            for req in admit:
                self._admit(req)
            if self.active:
                self._step()
        for r, req in enumerate(self.rows):
            if req is not None:
                self._finish(r, "cancelled")
        for req in self.pending:
            self._done(req, "cancelled")

    def _done(self, req: Request, reason: str, **info) -> None:
        req.info.update(info, tokens=req.tokens)
        try:
            req.on_done(reason, req.info)
        except Exception:  # a session's callback must not stop the engine
            log.exception("on_done callback failed")

    def _finish(self, r: int, reason: str, **info) -> None:
        req, self.rows[r] = self.rows[r], None
        req.info["decode_s"] = time.perf_counter() - req.info.get("t_first", time.perf_counter())
        self._done(req, reason, **info)

    def _admit(self, req: Request) -> None:
        if req.cancelled.is_set():
            return self._done(req, "cancelled")
        r = self.rows.index(None)
        t0 = time.perf_counter()
        req.info["queue_ms"] = 1000 * (t0 - req.submitted)
        m = self.model
        try:
            if isinstance(req.prepared, Exception):
                raise req.prepared
            embeds, mask = req.prepared
            self.key, sub = jax.random.split(self.key)
            with parallel.use_mesh(m.mesh):
                cache = KVCache.init(m.llm_cfg, 1, self.cache_len)
                tok, cache, _ = gen.prefill(m.llm, m.params["llm"], None, mask, cache, sub, inputs_embeds=embeds,
                                            **self.static, **self.dyn)
                self.cache = self._insert(self.cache, cache, r)
            tok = int(np.asarray(tok)[0])
        except Exception as e:  # a bad prompt ends this turn only
            log.warning("turn refused: %s", e)
            return self._done(req, "error", message=str(e) if isinstance(e, ValueError) else f"internal error: {e!r}")
        self.stats["prefills"] += 1
        self.stats["prefill_s"] += time.perf_counter() - t0
        req.info.update(prefill_ms=1000 * (time.perf_counter() - t0), t_first=time.perf_counter())
        self.rows[r] = req
        self.used[r] = int(embeds.shape[1])
        self._deliver(r, tok)
        self.from_host[r] = True

    def _deliver(self, r: int, tok: int) -> None:
        req = self.rows[r]
        if tok in self.stops:
            return self._finish(r, "stop")
        req.tokens += 1
        try:
            req.on_token(tok)
        except Exception:
            log.exception("on_token callback failed")
        if req.tokens >= min(req.max_new_tokens, self.max_new_tokens) or self.used[r] + 1 >= self.cache_len:
            return self._finish(r, "length")
        self.tokens[r] = tok

    def _step(self) -> None:
        """Dispatches the next step, then delivers the one in flight before it (see the module docstring)."""
        m = self.model
        t0 = time.perf_counter()
        self.key, sub = jax.random.split(self.key)
        try:
            with parallel.use_mesh(m.mesh):
                # copies: jnp.asarray may alias a numpy buffer on CPU, and the select runs after step k, while the
                # host already writes the next ids / flags into these arrays
                host, from_host = jnp.asarray(self.tokens.copy()), jnp.asarray(self.from_host.copy())
                ids = self._next_inputs(self.sampled, host, from_host)
                self.sampled, self.cache, _ = gen.decode_step(m.llm, m.params["llm"], ids, self.cache, sub,
                                                              **self.static, **self.dyn)
            self.from_host[:] = False
            self.stats["steps"] += 1  # dispatched (a token is delivered with the step after it already queued)
            previous, self.inflight = self.inflight, (self.sampled, list(self.rows))
            if previous is not None:
                self._collect(*previous)
            if not self.active:  # every row ended at the step just delivered: the one in flight has no reader
                self.inflight = None
        except Exception as e:  # the device step failed: every turn in it ends, the engine goes on
            log.exception("decode step failed")
            for r, req in enumerate(self.rows):
                if req is not None:
                    self._finish(r, "error", message=f"internal error: {e!r}")
            self.cache, self.sampled, self.inflight = self._fresh_cache(), self._no_ids(), None
            return
        self.stats["step_s"] += time.perf_counter() - t0

    def _collect(self, ids, owners: list) -> None:
        """Step ids ``[slots]`` (on the device) to the rows whose request is still the one they were computed for."""
        ids = np.asarray(ids)  # waits for that step alone: the next one is already queued behind it
        self.stats["row_steps"] += sum(req is not None for req in owners)
        for r, req in enumerate(owners):
            if req is not None and self.rows[r] is req:
                self.used[r] += 1
                self._deliver(r, int(ids[r]))
