"""Batched evaluation on a model: greedy (or sampled) generation and teacher-forced loss.

Examples run in global batches of ``batch_size`` rows: each process prepares its share (rows
``p * R .. (p + 1) * R`` of every batch, ``R = batch_size / processes``), the processes agree on
the batch's slot counts (tiles, clips, frames, length: one small all-gather), the arrays are placed
over the mesh's data axes, then one jitted prefill and one jitted device-side decode loop
(:func:`vita_jax.infer.generate.generate_device`) run until every row has stopped. The new ids
are gathered to every process, so every process holds every prediction (and writes nothing: the
caller's process 0 does). Rows past the last example are one-token dummies, discarded.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from vita_jax import parallel
from vita_jax.data import batch as batch_lib
from vita_jax.data import chat as chat_lib
from vita_jax.data import text as text_lib
from vita_jax.evals import readers
from vita_jax.infer import generate as gen
from vita_jax.models import lm_loss, qwen2
from vita_jax.models.vita import IGNORE_INDEX, VITA, lm_row_terms
from vita_jax.sizes import round_up

MODEL_PARTS = ("llm", "vision_tower", "mm_projector", "audio_encoder")
STATES = (text_lib.STATE_SPEECH, text_lib.STATE_TEXT, text_lib.STATE_NEGATIVE)


def row_loss_terms(logits, labels):
    """Per row ``(sum of CE over targets != -100, their count, argmax hits)`` of logits in hand
    ``[rows, L, vocab]`` for ``logits[:, :-1]`` against ``labels[:, 1:]`` (the official loss, not
    summed over rows). The engine itself never makes the full logits (:func:`_row_loss`)."""
    return lm_loss.row_terms(logits, labels, ignore_index=IGNORE_INDEX)


# module-level jits keyed by the (hashable) module: a new EvalEngine on the same model (each in-training
# evaluation builds one) reuses the compiled functions
@functools.partial(jax.jit, static_argnums=0)
def _embed(module, params, *args):
    return module.apply({"params": params}, *args, method=VITA.embed)


@functools.partial(jax.jit, static_argnums=0)
def _row_loss(module, params, labels, *args):
    return lm_row_terms(module, params, labels, *args)


class EvalEngine:
    """What the evaluators run on: ``module`` (:class:`~vita_jax.models.vita.VITA`), its ``params``
    (``{llm, vision_tower, mm_projector, audio_encoder}``; other heads ignored), ``config``,
    ``tokenizer``, an optional ``mesh`` and the LLM module the decode loop applies (default: built from
    ``module``'s config; :meth:`from_model` passes the model's own, quantized or not)."""

    def __init__(self, module: VITA, params: dict, config, tokenizer, mesh=None, llm=None):
        if tokenizer is None:
            raise ValueError("evaluation needs a tokenizer (tokenizer.json beside the checkpoint, or "
                             "config.data.tokenizer)")
        self.module, self.config, self.tokenizer, self.mesh = module, config, tokenizer, mesh
        self.params = {k: params[k] for k in MODEL_PARTS if k in params}
        # the decode loop's LLM: the model's own (a quantized model's computes from its int8 / int4 kernels)
        self.llm = llm if llm is not None else qwen2.Qwen2ForCausalLM(module.llm_cfg)
        self.prep = batch_lib.preprocess_settings(config)
        self._embed = functools.partial(_embed, module)
        self._loss = functools.partial(_row_loss, module)
        self.n_proc, self.proc = jax.process_count(), jax.process_index()
        dp = parallel.data_parallel_size(mesh)
        self.dp_local = max(dp // self.n_proc, 1)  # slots of each process: a multiple of its data-parallel share

    @classmethod
    def from_model(cls, m) -> "EvalEngine":
        """From a :class:`vita_jax.api.VitaModel`."""
        return cls(m.module, m.params, m.config, m.tokenizer, m.mesh, llm=m.llm)

    # ------------------------------------------------------------------------- layout
    def rows(self, batch_size: int) -> int:
        """Rows of this process per global batch (``batch_size`` rounded up to the data-parallel size)."""
        unit = self.n_proc * self.dp_local
        return round_up(max(int(batch_size), 1), unit) // self.n_proc

    def _place(self, x):
        if x is None:
            return None
        x = np.asarray(x)
        if self.mesh is None:
            return jnp.asarray(x)
        gshape = (x.shape[0] * self.n_proc,) + x.shape[1:]
        sh = parallel.data_sharding(self.mesh, x.ndim, shape=gshape)
        if self.n_proc == 1:
            return jax.device_put(x, sh)
        return jax.make_array_from_process_local_data(sh, x, gshape)

    def _check_order(self, rows: int) -> None:
        """The gathered rows must be process 0's, then process 1's, ... (a mesh over ``jax.devices()``)."""
        if self.n_proc > 1 and not getattr(self, "_order_ok", False):
            got = self._gather(self._place(np.arange(self.proc * rows, (self.proc + 1) * rows)))
            if not np.array_equal(got, np.arange(rows * self.n_proc)):
                raise RuntimeError("the mesh does not hold each process's rows as one block in process order")
            self._order_ok = True

    def _gather(self, x) -> np.ndarray:
        """A global (row-sharded) array -> the whole array as numpy on every process."""
        return np.asarray(x) if self.n_proc == 1 else np.asarray(multihost_utils.process_allgather(x, tiled=True))

    def _agree(self, needs: Sequence[int]) -> np.ndarray:
        """The element-wise maximum of every process's ``needs``."""
        v = np.asarray(needs, np.int64)
        return v if self.n_proc == 1 else np.asarray(multihost_utils.process_allgather(v)).reshape(-1, len(v)).max(0)

    def _batch(self, examples: list, rows: int, with_labels: bool = False, max_length: Optional[int] = None):
        """This process's examples (``input_ids``, optional ``labels`` / ``pixels`` / ``audio``) as
        placed model arguments ``(kind, text_ids, src, pixels, feats, lens)``, labels, and the row ids."""
        dummy = dict(input_ids=np.asarray([self.tokenizer.im_end_id], np.int64),
                     labels=np.asarray([IGNORE_INDEX], np.int64))
        exs = list(examples) + [dummy] * (rows - len(examples))
        ids, labels, mask = batch_lib.pad_rows([dict(e, labels=e.get("labels", e["input_ids"])) for e in exs])
        pixels = [e["pixels"] for e in exs if e.get("pixels") is not None]
        px = batch_lib.concat_tiles(pixels, 0) if pixels else None
        clips = [c for e in exs for c in batch_lib.example_clips(e)]
        limit = max_length or self.config.tokenizer_model_max_length
        longest = max(min(batch_lib.spliced_length(e, self.module.tokens_per_tile), limit) for e in exs)
        bucket = int(self.config.get("seq_bucket", 64))
        n_tiles, frames = (0 if px is None else len(px)), max([len(c) for c in clips] + [0])
        tiles, n_clips, frames, length = self._agree([n_tiles, len(clips), frames, round_up(longest, bucket)])
        tile_slots = batch_lib.bucket(int(tiles), self.dp_local) if tiles else 0
        clip_slots = batch_lib.bucket(int(n_clips), self.dp_local) if n_clips else 0
        fb = int(self.config.get("frame_bucket", 64))
        frame_slots = min(round_up(int(frames), fb), self.module.whale_cfg.max_frames) if n_clips else 0
        arrays, plan = chat_lib.inference_batch(
            self.module, self.config, ids, mask, labels if with_labels else None, px, clips, dp=self.dp_local,
            max_length=limit, tile_slots=tile_slots, clip_slots=clip_slots, frame_slots=frame_slots,
            length=int(length), tile_offset=self.proc * tile_slots, clip_offset=self.proc * clip_slots)
        args = tuple(self._place(arrays[k]) for k in ("kind", "text_ids", "src", "pixels", "audio_feats",
                                                      "audio_lens"))
        return args, (self._place(arrays["labels"]) if with_labels else None), plan

    # ------------------------------------------------------------------------- generation
    def prepare(self, ex: dict, frames: Optional[int] = None) -> dict:
        """A task example (``question``, ``image`` / ``audio`` / ``video``) -> its chat example."""
        prep = self.prep
        if frames:
            prep = dataclasses.replace(prep, video_max_frames=int(frames), video_min_frames=int(frames))
        where = ex.get("where")
        try:
            return chat_lib.chat_example(prep, self.tokenizer, ex.get("question") or "",
                                         image=readers.as_file(ex.get("image"), where and f"{where} image"),
                                         audio=ex.get("audio"), video=readers.as_file(ex.get("video"),
                                                                                      where and f"{where} video"))
        except (ValueError, OSError) as e:  # the example's file and row named with the medium's error
            if where is None:
                raise
            raise readers.located(where, e) from e

    def _shares(self, n: int, batch_size: int) -> Iterator[tuple[int, range]]:
        rows = self.rows(batch_size)
        for start in range(0, n, rows * self.n_proc):
            lo = start + self.proc * rows
            yield start, range(min(lo, n), min(lo + rows, n))

    def generate(self, examples: Sequence[dict], batch_size: int = 8, max_new_tokens: int = 64,
                 frames: Optional[int] = None, progress=None, **sampling) -> Iterator[list[str]]:
        """Yields the reply texts of each global batch, in example order (every process gets all)."""
        rows = self.rows(batch_size)
        stops = sorted({i for i in (self.config.get("eos_token_id", -1), self.tokenizer.im_end_id,
                                    self.tokenizer.im_start_id) if i is not None and i >= 0})
        self._check_order(rows)
        for start, mine in self._shares(len(examples), batch_size):
            prepared = [self.prepare(examples[i], frames) for i in mine]
            args, _, plan = self._batch(prepared, rows, max_length=sys.maxsize)
            limit = int(self.config.tokenizer_model_max_length)
            if len(mine) and int(plan.lengths[:len(mine)].max()) > limit:
                k = int(np.argmax(plan.lengths[:len(mine)]))
                raise ValueError(f"example {examples[mine[k]]['id']}: the prompt is {int(plan.lengths[k])} positions "
                                 f"with its media, over config.tokenizer_model_max_length = {limit}")
            with parallel.use_mesh(self.mesh):
                embeds = self._embed(self.params, *args)
                out = gen.generate_device(self.llm, self.params["llm"], self.module.llm_cfg,
                                          self._place(plan.attention_mask), inputs_embeds=embeds,
                                          max_new_tokens=int(max_new_tokens), stop_ids=stops,
                                          vocab_limit=len(self.tokenizer), **sampling)
            ids = self._gather(out)
            n_here = min(rows * self.n_proc, len(examples) - start)
            texts = [self.decode(ids[r]) for r in range(n_here)]
            if progress is not None:
                progress.update(n_here)
            yield texts

    def decode(self, ids) -> str:
        """New ids of one row -> the reply text, without the leading state symbol (☜ / ☞ / ☟)."""
        keep = [int(t) for t in ids if t >= 0 and t not in (self.tokenizer.im_end_id, self.tokenizer.im_start_id)]
        text = self.tokenizer.decode(keep).strip()
        while text[:1] in STATES and text:
            text = text[1:].lstrip()
        return text

    # ------------------------------------------------------------------------- loss
    def loss(self, ids: Sequence[str], get, batch_size: int = 8, progress=None) -> Iterator[list[dict]]:
        """Teacher-forced ``{id, nll, tokens, correct}`` of each official example: ``ids`` of all
        examples, ``get(i)`` -> example ``i`` (``input_ids``, ``labels``, media), called only for this
        process's share; a ``{"id", "bad"}`` example scores nothing and is marked ``bad``."""
        rows = self.rows(batch_size)
        self._check_order(rows)
        for start, mine in self._shares(len(ids), batch_size):
            exs = [get(i) for i in mine]
            bad = np.zeros(rows, np.int32)
            bad[:len(exs)] = [int("bad" in e) for e in exs]
            good = [e if "bad" not in e else dict(input_ids=np.asarray([self.tokenizer.im_end_id], np.int64),
                                                   labels=np.asarray([IGNORE_INDEX], np.int64)) for e in exs]
            args, labels, _ = self._batch(good, rows, with_labels=True)
            with parallel.use_mesh(self.mesh):
                terms = self._loss(self.params, labels, *args)
            nll, count, hits, flags = (self._gather(t) for t in (*terms, self._place(bad)))
            n_here = min(rows * self.n_proc, len(ids) - start)
            recs = [dict(id=ids[start + r], nll=float(nll[r]), tokens=int(count[r]), correct=int(hits[r]))
                    if not flags[r] else dict(id=ids[start + r], bad=True, nll=0.0, tokens=0, correct=0)
                    for r in range(n_here)]
            if progress is not None:
                progress.update(n_here)
            yield recs
