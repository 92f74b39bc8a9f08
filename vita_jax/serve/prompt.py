"""A serving prompt's embeddings from a fixed set of programs: no compile after warm-up for any question.

``VitaModel.prompt_embeds`` (generate, eval) compiles one program per combination of spliced length, tile count
and clip frames: a live server meets a new combination with nearly every spoken question (a clip of 1-15 s
spans 24 frame buckets, the prompt grows with the history). Here each shape varies alone, along a short ladder,
in a program of its own, and :meth:`PromptShapes.warmup` compiles all of them before the first session:

* InternViT per tile count (powers of two times the data-parallel size, up to ``max_tiles`` or what
  ``max_prompt`` holds): the rows written into one image buffer ``[image_rows, width]``;
* the whale encoder per clip length (frames padded up ``FRAMES``, then the encoder's maximum), one clip at a
  time, its rows written into one audio buffer ``[audio_rows, width]`` at the clip's first row;
* the splice (text embeddings, buffer rows put in place) per prompt length (``LENGTHS`` up to ``max_prompt``),
  and the LLM prefill per prompt length (:class:`vita_jax.serve.engine.ServeEngine`).

The numbers are those of ``prompt_embeds``: the same towers on the same real frames (a clip's encoding does not
depend on its padding), the same splice plan; padding positions are zeros and masked.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from vita_jax import parallel
from vita_jax.data import batch as batch_lib
from vita_jax.models import whale
from vita_jax.models.vita import PAD, VITA
from vita_jax.sizes import round_up, rung

LENGTHS = (128, 256, 512, 1024, 2048, 4096, 8192)  # spliced prompt positions
FRAMES = (256, 512, 1024, 2048)  # fbank frames of a clip (10 ms each), then the encoder's maximum


def _ladder(steps: Sequence[int], top: int) -> tuple:
    return tuple(n for n in steps if n < top) + (top,)


class PromptShapes:
    """The prompt path of a server for ``model`` (a :class:`vita_jax.api.VitaModel`) and prompts of up to
    ``max_prompt`` spliced positions and ``max_tiles`` image tiles (None: as many as ``max_prompt`` holds)."""

    def __init__(self, model, max_prompt: int, max_tiles: Optional[int] = None):
        m = self.model = model
        self.lengths = _ladder(LENGTHS, round_up(int(max_prompt), 64))
        self.max_prompt = self.lengths[-1]
        tpt, dp = m.tokens_per_tile, m.dp
        self.tiles = ()
        if m.vit_cfg is not None:  # tile slots: bucket() values up to what the longest prompt can hold
            most = max(min(self.max_prompt // tpt, max_tiles or self.max_prompt), 1)
            top, b = batch_lib.bucket(most, dp), batch_lib.bucket(1, dp)
            while b <= top:
                self.tiles, b = self.tiles + (b,), batch_lib.bucket(b + 1, dp)
        self.frames = _ladder(FRAMES, m.whale_cfg.max_frames) if m.whale_cfg is not None else ()
        width, dtype = m.llm_cfg.hidden_size, m.llm_cfg.dtype
        self.image_rows = self.tiles[-1] * tpt if self.tiles else 0
        # clips sit at their real first rows; the last one's padded tail reaches at most this far
        self.audio_rows = round_up(self.max_prompt + int(whale.llm_length(self.frames[-1])), 64) if self.frames else 0
        # the row buffers have one placement, whatever made them (warm-up's zeros or a tower's output): jit keys its
        # cache on it, so a mismatch would compile the splice again on the first real image or clip
        rows_sharding = NamedSharding(m.mesh, PartitionSpec()) if m.mesh is not None else None
        place = (lambda a: jax.device_put(a, rows_sharding)) if rows_sharding is not None else \
            (lambda a: parallel.commit_like(a, m.params))
        self._empty = {k: place(jnp.zeros((n, width), dtype)) if n else None
                       for k, n in (("image", self.image_rows), ("audio", self.audio_rows))}
        mod = m.module

        def images(p, pixels):
            rows = mod.apply({"params": p}, pixels, method=VITA.encode_images)
            rows = rows.reshape(-1, rows.shape[-1]).astype(dtype)
            return jnp.pad(rows, ((0, self.image_rows - rows.shape[0]), (0, 0)))

        def audio_into(p, buf, feats, lengths, first):
            rows = mod.apply({"params": p}, feats, lengths, method=VITA.encode_audio)[0].astype(dtype)
            return jax.lax.dynamic_update_slice(buf, rows, (first, jnp.zeros((), jnp.int32)))

        def splice(p, kind, text_ids, src, image_rows, audio_rows):
            return mod.apply({"params": p}, kind, text_ids, src, image_rows, audio_rows, method=VITA.splice)

        self._images, self._splice = jax.jit(images, out_shardings=rows_sharding), jax.jit(splice)
        self._audio_into = jax.jit(audio_into, donate_argnums=1, out_shardings=rows_sharding)

    # ------------------------------------------------------------------ shapes
    def _pick(self, ladder: tuple, n: int, what: str) -> int:
        b = rung(ladder, n)
        if b is None:
            raise ValueError(f"{what}: {n}, over this server's largest {ladder[-1]}")
        return b

    def length(self, n: int) -> int:
        """The ladder's prompt length for ``n`` spliced positions (a ValueError past ``max_prompt``)."""
        if n > self.max_prompt:
            raise ValueError(f"the prompt needs {n} positions, over this server's max_prompt {self.max_prompt}: "
                             "a shorter question, or restart with a larger --max-prompt")
        return self._pick(self.lengths, n, "prompt positions")

    # ------------------------------------------------------------------ the prompt
    def embeds(self, input_ids, pixels=None, clips: Sequence[np.ndarray] = ()):
        """``input_ids [n]`` (placeholders included), tiles ``[t, 3, S, S]`` (or None), fbank clips ``[[T_i, mel]]`` ->
        ``(embeds [1, L, width], attention_mask [1, L])`` with ``L`` from :attr:`lengths`."""
        m = self.model
        feats, lens = m.pad_clips(list(clips))
        px = m._check_pixels(pixels)
        feats, lens = m._check_audio(feats, lens)
        llm_lens = [int(whale.llm_length(int(n))) for n in lens]
        bases = np.concatenate([[0], np.cumsum(llm_lens)[:-1]]).astype(int).tolist() if llm_lens else []
        n_tiles = 0 if px is None else len(px)
        plan = batch_lib.plan_splice(np.asarray(input_ids)[None], tokens_per_tile=m.tokens_per_tile,
                                     audio_llm_lengths=llm_lens, max_length=sys.maxsize, pad_to=1, n_tiles=n_tiles,
                                     audio_bases=bases)
        n = int(plan.lengths.max())
        limit = int(m.config.tokenizer_model_max_length)
        if n > limit:
            raise ValueError(f"the prompt is {n} positions long with its media spliced in, over "
                             f"config.tokenizer_model_max_length = {limit}")
        if (plan.text_ids >= m.llm_cfg.vocab_size).any():
            raise ValueError(f"input_ids hold ids >= the vocabulary size {m.llm_cfg.vocab_size}")
        L = self.length(n)
        pad = ((0, 0), (0, L - plan.kind.shape[1]))
        kind, text_ids, src = (np.pad(a, pad, constant_values=v) for a, v in
                               ((plan.kind, PAD), (plan.text_ids, 0), (plan.src, 0)))
        with parallel.use_mesh(m.mesh):
            img = self._empty["image"]
            if n_tiles:
                tb = self._pick(self.tiles, n_tiles, "image tiles")
                slots = np.zeros((tb,) + px.shape[1:], px.dtype)
                slots[:n_tiles] = px
                img = self._images(m.params, m._place(slots))
            aud = self._empty["audio"]
            if llm_lens:
                aud = jnp.copy(aud)  # the donated buffer: never the shared empty one
                for k, (f, real) in enumerate(zip(feats, lens)):
                    aud = self._audio_clip(aud, f[:real], bases[k])
            x = self._splice(m.params, *(m._place(a) for a in (kind, text_ids, src)), img, aud)
        return x, m._place((kind != PAD).astype(np.int32))

    def _audio_clip(self, buf, feats: np.ndarray, first: int):
        frames = self._pick(self.frames, len(feats), "clip frames")
        slot = np.zeros((1, frames, feats.shape[1]), np.float32)
        slot[0, :len(feats)] = feats
        m = self.model
        return self._audio_into(m.params, buf, m._place(slot), m._place(np.array([len(feats)], np.int32)),
                                jnp.int32(first))

    # ------------------------------------------------------------------ warm-up
    def warmup(self, prefill=None) -> int:
        """Compiles every program a prompt can need (each tile count, clip length and prompt length); ``prefill``
        (optional): called with each length's ``(embeds, attention_mask)`` as :meth:`embeds` returns them, to
        compile what the caller runs on them. Returns how many shapes were warmed."""
        m, n = self.model, 0
        with parallel.use_mesh(m.mesh):
            for tb in self.tiles:
                s = m.vit_cfg.image_size
                jax.block_until_ready(self._images(m.params, m._place(np.zeros((tb, 3, s, s), np.uint8))))
                n += 1
            for frames in self.frames:
                buf = jnp.copy(self._empty["audio"])
                feats = np.zeros((frames, m.whale_cfg.input_dim), np.float32)
                jax.block_until_ready(self._audio_clip(buf, feats, 0))
                n += 1
            for L in self.lengths:
                z = np.zeros((1, L), np.int32)
                kind = np.full((1, L), PAD, np.int8)
                kind[0, 0] = 0  # one text position: a prefill of nothing but padding is not a real prompt
                x = self._splice(m.params, m._place(kind), m._place(z), m._place(z), self._empty["image"],
                                 self._empty["audio"])
                jax.block_until_ready(x if prefill is None else prefill(x, m._place((kind != PAD).astype(np.int32))))
                n += 1
        return n
