"""The public entry point: :func:`from_pretrained` and the :class:`VitaModel` it returns.

:class:`VitaModel` is a facade: preprocessing and the batch layout come from
:mod:`vita_jax.data.batch` (the builder training uses), the model from
:meth:`vita_jax.models.vita.VITA.from_config`, decoding from :mod:`vita_jax.infer`, reading and
writing checkpoints from :mod:`vita_jax.convert`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from vita_jax import parallel
from vita_jax.convert import model_checkpoint, orbax_io, pytorch, release
from vita_jax.data import batch as batch_lib
from vita_jax.data import chat as chat_lib
from vita_jax.data import text as text_lib
from vita_jax.infer import generate as gen
from vita_jax.infer.speech import SpeechModel, embedding_rows, split_reply, trim_leading
from vita_jax.infer.speech_engine import SlotOptions
from vita_jax.models import quantize as quantize_lib
from vita_jax.models import qwen2
from vita_jax.models import vita as vita_lib
from vita_jax.models.vita import VITA, lm_row_terms

load_tokenizer = text_lib.load_tokenizer
init_params = vita_lib.init_module  # random parameters of one module: (module, mesh=None, seed=0, example=None)


class VitaModel:
    """A loaded VITA-1.5. ``config`` (ConfigDict), ``params`` (``{llm, vision_tower, mm_projector,
    audio_encoder}``), ``tokenizer`` (:class:`~vita_jax.data.text.TextTokenizer` or None), ``mesh``."""

    def __init__(self, config, params, tokenizer=None, mesh=None, keys_read=(), source_dtypes=None, path=None,
                 speech=None):
        self.config, self.params, self.tokenizer, self.mesh = config, params, tokenizer, mesh
        self.speech = speech
        self.keys_read = list(keys_read)
        self.source_dtypes = dict(source_dtypes or {})
        self.path = path
        self.module = VITA.from_config(config)
        self.llm_cfg, self.vit_cfg, self.whale_cfg = self.module.llm_cfg, self.module.vit_cfg, self.module.whale_cfg
        self.llm = qwen2.Qwen2ForCausalLM(self.llm_cfg)
        self.prep = batch_lib.preprocess_settings(config)  # exactly the preprocessing training uses
        self.image_processor = self.prep.image
        self.quantized = None
        self._jit()

    def _jit(self) -> None:
        """The jitted entry points over ``self.module`` (rebuilt when :meth:`quantize` wraps it)."""
        m = self.module
        self._logits = jax.jit(lambda p, *a: m.apply({"params": p}, *a).astype(jnp.float32))
        self._loss = jax.jit(lambda p, labels, *a: tuple(jnp.sum(t) for t in lm_row_terms(m, p, labels, *a)[:2]))
        self._embed = jax.jit(lambda p, *a: m.apply({"params": p}, *a, method=VITA.embed))
        self._images = jax.jit(lambda p, x: m.apply({"params": p}, x, method=VITA.encode_images).astype(jnp.float32))
        self._audio = jax.jit(
            lambda p, f, n: m.apply({"params": p}, f, n, method=VITA.encode_audio).astype(jnp.float32))

    def quantize(self, qtype: str = "int8", targets=quantize_lib.LLM_LINEAR) -> "VitaModel":
        """Weight-only ``qtype`` ("int8" / "int4") for the kernels ``targets`` matches (default: the LLM's linear
        layers; :mod:`vita_jax.models.quantize`), for every entry point. In place; returns self."""
        if self.quantized is not None:
            raise ValueError(f"the model is already quantized ({self.quantized})")
        self.params, self.module, self.llm = quantize_lib.model(self.config, self.params, self.module, self.llm,
                                                                qtype, targets)
        self.quantized = qtype
        self._jit()
        return self

    # ----------------------------------------------------------------------------- helpers
    @property
    def dp(self) -> int:
        return parallel.data_parallel_size(self.mesh)

    def _place(self, x):
        if x is None:
            return None
        x = jnp.asarray(x)
        if self.mesh is None:
            return x
        return jax.device_put(x, parallel.data_sharding(self.mesh, x.ndim, shape=x.shape))

    @property
    def tokens_per_tile(self) -> int:
        return self.module.tokens_per_tile

    def _check_pixels(self, pixel_values):
        """Tiles ``[n, 3, H, W]``: uint8 RGB tiles (normalised by the model) as they are, float pixel
        values (already normalised) as float32; None when there are none."""
        if pixel_values is None or len(pixel_values) == 0:
            return None
        if self.vit_cfg is None:
            raise ValueError("this model has no vision tower (config.json names no mm_vision_tower)")
        px = np.asarray(pixel_values)
        px = px if px.dtype == np.uint8 else px.astype(np.float32)
        if px.ndim != 4 or px.shape[1] != 3:
            raise ValueError(f"pixel_values must be [tiles, 3, H, W], got shape {px.shape}")
        return px

    def _check_audio(self, features, lengths):
        """Zero-padded fbank ``[clips, T, mel]`` (or one clip ``[T, mel]``) and lengths, checked
        against the encoder -> ``(features, lengths)``, or ``(None, empty lengths)`` without audio."""
        if features is None or len(features) == 0:
            return None, np.zeros(0, np.int64)
        if self.whale_cfg is None:
            raise ValueError("this model has no audio encoder (config.json names no mm_audio_encoder)")
        f = np.asarray(features, np.float32)
        f = f[None] if f.ndim == 2 else f
        n = f.shape[0]
        lengths = np.full(n, f.shape[1]) if lengths is None else np.asarray(lengths, np.int64).reshape(-1)
        if f.ndim != 3 or f.shape[2] != self.whale_cfg.input_dim or lengths.shape[0] != n:
            raise ValueError(f"audio features must be [clips, frames, {self.whale_cfg.input_dim}] with one length per "
                             f"clip, got {f.shape} and {lengths.shape[0]} lengths")
        if (lengths < 7).any() or (lengths > f.shape[1]).any():
            raise ValueError(f"audio lengths {lengths.tolist()} must be within 7..{f.shape[1]} frames (7 frames = "
                             "85 ms is the shortest clip that gives one LLM token)")
        max_frames = self.whale_cfg.max_frames
        if lengths.max() > max_frames:
            raise ValueError(f"an audio clip of {int(lengths.max())} frames ({lengths.max() / 100:.1f} s) exceeds the "
                             f"encoder's {self.whale_cfg.max_positions}-row position table "
                             f"(at most {max_frames} frames)")
        return f, lengths

    def batch(self, input_ids, attention_mask=None, labels=None, pixel_values=None, audio_features=None,
              audio_lengths=None, max_length: Optional[int] = None):
        """The host batch of an inference call -> ``(arrays, plan)``: :func:`vita_jax.data.batch.build`
        (what training uses) with bucketed slots: tiles and clips to a power of two times the
        data-parallel size, frames to a multiple of ``config.frame_bucket``, the spliced length to
        one of ``config.seq_bucket``, rows cut at ``config.tokenizer_model_max_length``."""
        ids = np.asarray(input_ids)
        if ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError("input_ids: expected a non-empty array of integer ids, "
                             f"got {ids.dtype} of shape {ids.shape}")
        px = self._check_pixels(pixel_values)
        feats, lengths = self._check_audio(audio_features, audio_lengths)
        arrays, plan = chat_lib.inference_batch(self.module, self.config, input_ids, attention_mask, labels, px,
                                                [] if feats is None else list(feats), lengths, dp=self.dp,
                                                max_length=max_length)
        if (plan.text_ids >= self.llm_cfg.vocab_size).any():
            raise ValueError(f"input_ids hold ids >= the vocabulary size {self.llm_cfg.vocab_size} (the largest: "
                             f"{int(plan.text_ids.max())})")
        return arrays, plan

    def _prepare(self, input_ids, attention_mask, labels, pixel_values, audio_features, audio_lengths,
                 max_length: Optional[int] = None):
        arrays, plan = self.batch(input_ids, attention_mask, labels, pixel_values, audio_features, audio_lengths,
                                  max_length)
        return plan, tuple(self._place(arrays[k]) for k in ("kind", "text_ids", "src", "pixels", "audio_feats",
                                                              "audio_lens"))

    # ----------------------------------------------------------------------------- text / LLM
    def forward(self, input_ids, attention_mask=None, pixel_values=None, audio_features=None,
                audio_lengths=None) -> np.ndarray:
        """float32 logits ``[batch, L, vocab]`` over the **spliced** sequence, right-padded, laid
        out as the official ``prepare_inputs_labels_for_multimodal`` (``pixel_values``: real tiles
        in placeholder order, uint8 RGB tiles or normalised floats; ``audio_features``: real clips,
        zero-padded fbank before CMVN)."""
        plan, args = self._prepare(input_ids, attention_mask, None, pixel_values, audio_features, audio_lengths)
        with parallel.use_mesh(self.mesh):
            out = self._logits(self.params, *args)
        return np.asarray(out)[:, :int(plan.lengths.max())]

    def loss(self, input_ids, attention_mask, labels, pixel_values=None, audio_features=None,
             audio_lengths=None) -> float:
        """The official scalar loss: mean CE of ``logits[:, :-1]`` vs spliced ``labels[:, 1:]``."""
        plan, args = self._prepare(input_ids, attention_mask, labels, pixel_values, audio_features, audio_lengths)
        with parallel.use_mesh(self.mesh):
            total, count = self._loss(self.params, self._place(plan.labels), *args)
        return float(total) / max(int(count), 1)

    def generate(self, input_ids, attention_mask=None, pixel_values=None, audio_features=None,
                 audio_lengths=None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop_ids: Optional[Sequence[int]] = None, vocab_limit: Optional[int] = None) -> np.ndarray:
        """Prefill of the spliced prompt, then cached decoding -> new ids ``[batch, n]`` (-1 after a
        row's stop token). Stops on ``<|im_end|>`` and ``<|im_start|>`` (the config's eos and the
        tokenizer's im_start) unless ``stop_ids`` is given; logits limited to ``len(tokenizer)``."""
        gen.check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p)
        ids = np.asarray(input_ids)
        ids = ids[None] if ids.ndim == 1 else ids
        stop_ids = self.stop_ids if stop_ids is None else stop_ids
        if vocab_limit is None and self.tokenizer is not None:
            vocab_limit = len(self.tokenizer)
        embeds, mask = self.prompt_embeds(ids, attention_mask, pixel_values, audio_features, audio_lengths)
        with parallel.use_mesh(self.mesh):
            return gen.generate(self.llm, self.params["llm"], self.llm_cfg, None, mask, inputs_embeds=embeds,
                                max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids, vocab_limit=vocab_limit)

    @property
    def stop_ids(self) -> list:
        """What ends a reply: the config's eos (``<|im_end|>``) and the tokenizer's ``<|im_start|>``."""
        return [i for i in (self.config.eos_token_id, self.tokenizer.im_start_id if self.tokenizer is not None else -1)
                if i >= 0]

    def prompt_embeds(self, input_ids, attention_mask=None, pixel_values=None, audio_features=None,
                      audio_lengths=None):
        """The spliced prompt on the device: ``(embeds [batch, L, width], attention_mask [batch, L])``
        with ``L`` a ``seq_bucket`` length (right padding), ready for :func:`vita_jax.infer.generate.prefill`.
        A prompt over ``config.tokenizer_model_max_length`` is refused (``ValueError``), never cut."""
        # training's cut at the limit would drop the assistant header and the model would continue the
        # user's text: measured uncut, refused when over the limit, before any compile
        plan, args = self._prepare(input_ids, attention_mask, None, pixel_values, audio_features, audio_lengths,
                                   max_length=sys.maxsize)
        limit = int(self.config.tokenizer_model_max_length)
        if int(plan.lengths.max()) > limit:
            raise ValueError(f"the prompt is {int(plan.lengths.max())} positions long with its media spliced in, over "
                             f"config.tokenizer_model_max_length = {limit}: shorten the question or history, or "
                             f"send fewer image tiles / video frames (it is not cut, which would drop the template)")
        with parallel.use_mesh(self.mesh):
            return self._embed(self.params, *args), self._place(plan.attention_mask)

    def chat_inputs(self, messages: Union[str, Sequence], image=None, audio=None, video=None,
                    max_tiles: Optional[int] = None) -> dict:
        """The prompt of :meth:`chat` as an example: ``input_ids`` (the official template, system
        prompt and placeholders), ``pixels`` (``[tiles, 3, S, S]`` or None) and ``audio`` (fbank
        clips), preprocessed exactly as training preprocesses a sample (``self.prep``). A history
        turn may be ``(role, text, audio)``: a spoken turn, its clip placed before the question's.
        ``max_tiles`` overrides ``image.max_dynamic_patch`` for this image."""
        if video is not None and image is not None:
            raise ValueError("image and video: give one of them, not both (the prompt holds one visual input)")
        if self.tokenizer is None:
            raise ValueError(f"{self.path}: no tokenizer.json, chat() needs one")
        prep = self.prep if max_tiles is None else dataclasses.replace(self.prep, max_tiles=int(max_tiles))
        return chat_lib.chat_example(prep, self.tokenizer, messages, image=image, audio=audio, video=video)

    def chat(self, messages: Union[str, Sequence], image=None, audio=None, video=None, max_new_tokens: int = 256,
             **sampling) -> str:
        """Reply text to a question (or ``[(role, content), ...]`` history ending with a user turn),
        with optional ``image`` (path/PIL), ``audio`` (path or ``(waveform, rate)``) and ``video``
        (path). The official template, system prompt and state symbol handling are applied."""
        gen.check_sampling(max_new_tokens, **{k: v for k, v in sampling.items() if k in (
            "do_sample", "temperature", "top_k", "top_p")})
        ex = self.chat_inputs(messages, image=image, audio=audio, video=video)
        feats, lengths = self.pad_clips(ex["audio"])
        out = self.generate(ex["input_ids"][None], pixel_values=ex["pixels"], audio_features=feats,
                            audio_lengths=lengths, max_new_tokens=max_new_tokens, **sampling)[0]
        new = [int(t) for t in out if t >= 0 and t not in (self.tokenizer.im_end_id, self.tokenizer.im_start_id)]
        return self.tokenizer.decode(new)

    @staticmethod
    def pad_clips(clips):
        """fbank clips ``[[T_i, mel], ...]`` -> ``(zero-padded [clips, max T, mel], lengths)``, or ``(None, None)``."""
        if not clips:
            return None, None
        lengths = [len(c) for c in clips]
        out = np.zeros((len(clips), max(lengths), clips[0].shape[1]), np.float32)
        for i, c in enumerate(clips):
            out[i, :len(c)] = c
        return out, lengths

    # ----------------------------------------------------------------------------- speech output
    def speech_input(self, text: str) -> np.ndarray:
        """Decoder input for a reply: the LLM input-embedding rows of the re-tokenised text (state
        symbols and ``<|im_end|>`` removed), each split row-major into 4 vectors -> ``[4·n, idim]``."""
        if self.tokenizer is None:
            raise ValueError("speak() needs a tokenizer to re-tokenise the reply")
        if self.speech is None:
            raise ValueError("no speech decoder: the release directory has no vita_tts_ckpt/ (or use load_speech)")
        for sym in (text_lib.STATE_SPEECH, text_lib.STATE_TEXT, text_lib.STATE_NEGATIVE, text_lib.IM_END):
            text = text.replace(sym, "")
        ids = self.tokenizer.encode(text.strip()) if text.strip() else []
        rows = embedding_rows(self.params["llm"]["model"]["embed_tokens"]["embedding"], ids)
        idim = self.speech.decoder_cfg.idim
        if self.llm_cfg.hidden_size % idim:
            raise ValueError(f"LLM width {self.llm_cfg.hidden_size} is not a multiple of the speech decoder's {idim}")
        return rows.reshape(-1, idim)

    def speak_stream(self, text: str, top_k: int = 2, seed: int = 0, max_tokens: int = 1000,
                     first: tuple = (20, 0.1), later: tuple = (40, 0.015), padding_size: int = 10, stop=None,
                     engine=None):
        """Yields waveform segments (float32 at ``self.speech.sample_rate``) as they are produced,
        as the release server does it: the reply is cut into pieces at punctuation
        (:func:`~vita_jax.infer.speech.split_reply`), each piece is a fresh decoder run; the first
        piece uses ``first = (chunk, threshold)`` = (20, 0.1) and has its leading near-silence
        trimmed, later pieces ``later`` = (40, 0.015). ``text`` may also be an iterable of pieces
        already cut (the live server feeds them as the LLM writes them); ``stop()`` returning True
        ends it between two decoder steps. ``engine``: a
        :class:`~vita_jax.infer.speech_scheduler.SpeechScheduler` that decodes the pieces on the device,
        batched with its other callers' (a piece longer than its ``max_input`` is decoded here)."""
        pieces = split_reply(text) if isinstance(text, str) else text
        for k, piece in enumerate(pieces):
            x = self.speech_input(piece)
            if x.shape[0] == 0:
                continue
            chunk, thr = first if k == 0 else later
            trimming = k == 0
            source = x
            if engine is not None and engine.takes(x.shape[0], max_tokens):
                source = engine.submit(x, SlotOptions(top_k=top_k, seed=seed + k, max_tokens=max_tokens), stop=stop)
            for seg in self.speech.stream(source, chunk_size=chunk, padding_size=padding_size, seg_threshold=thr,
                                          top_k=top_k, seed=seed + k, max_tokens=max_tokens, stop=stop):
                if trimming:
                    seg = trim_leading(seg)
                    trimming = len(seg) == 0
                if len(seg):
                    yield seg
            if stop is not None and stop():
                return

    def speak(self, text: str, **kw) -> np.ndarray:
        """Reply text -> decoder -> codec -> float32 waveform (empty for empty text)."""
        segs = list(self.speak_stream(text, **kw))
        return np.concatenate(segs) if segs else np.zeros(0, np.float32)

    # ----------------------------------------------------------------------------- vision
    def preprocess_image(self, image, max_num: Optional[int] = None) -> np.ndarray:
        """A PIL image or path -> float32 ``[tiles, 3, S, S]`` (dynamic tiling + CLIP processor: the
        official ``pixel_values``; chat's own batches carry the uint8 tiles, normalised by the model)."""
        prep = dataclasses.replace(self.prep, normalise=True, max_tiles=self.prep.max_tiles if max_num is None
                                   else int(max_num))
        return prep.tiles(image)

    def preprocess_video(self, path: str, video_fps: Optional[float] = None) -> np.ndarray:
        """A video file -> float32 ``[frames, 3, S, S]`` (4..16 frames, one tile each)."""
        prep = dataclasses.replace(self.prep, normalise=True, video_fps=self.prep.video_fps if video_fps is None
                                   else float(video_fps))
        return prep.frames(path)

    def encode_images(self, pixel_values) -> np.ndarray:
        """``[tiles, 3, S, S]`` (uint8 tiles or normalised floats) -> projector output ``[tiles,
        tokens_per_tile, llm_width]`` (float32)."""
        px = self._check_pixels(pixel_values)
        if px is None:
            return np.zeros((0, self.tokens_per_tile, self.llm_cfg.hidden_size), np.float32)
        n = len(px)
        px = np.concatenate([px, np.zeros((batch_lib.bucket(n, self.dp) - n,) + px.shape[1:], px.dtype)])
        with parallel.use_mesh(self.mesh):
            out = self._images(self.params, self._place(px))
        return np.asarray(out)[:n]

    # ----------------------------------------------------------------------------- speech
    def audio_features(self, waveform, sample_rate: Optional[int] = None) -> np.ndarray:
        """A waveform (float in [-1, 1] or int16, any rate, mono or stereo) or an audio file path ->
        float32 Kaldi fbank ``[frames, 80]`` before CMVN (dither from the config, 0 by default)."""
        return self.prep.fbank(waveform, sample_rate)

    def encode_audio(self, features, lengths):
        """Zero-padded fbank ``[clips, frames, 80]`` (before CMVN), ``lengths [clips]`` ->
        ``(embeddings [clips, T, llm_width], lengths_for_llm [clips])``."""
        ids = np.full((1, 1), vita_lib.AUDIO_TOKEN_INDEX)
        feats, lens = self._check_audio(features, lengths)
        if feats is None:
            raise ValueError("no audio clips given")
        arrays, _ = self.batch(np.repeat(ids, len(feats), 0), None, None, None, feats, lens)
        with parallel.use_mesh(self.mesh):
            emb = self._audio(self.params, self._place(arrays["audio_feats"]), self._place(arrays["audio_lens"]))
        llm_lens = batch_lib.llm_length(lens).astype(np.int32)
        return np.asarray(emb)[:len(feats), :int(llm_lens.max())], llm_lens


    # ----------------------------------------------------------------------------- saving
    def save_pretrained(self, path: str, format: str = "pytorch", overwrite: bool = False,
                        max_shard_bytes: int = 5 * 1024 ** 3):
        """Writes the model: ``format="pytorch"`` -> the official release layout (safetensors shards + index, config
        files, tokenizer, tower folders, ``vita_tts_ckpt``; source dtypes kept); ``"orbax"`` -> a vita_jax checkpoint
        that :func:`from_pretrained` reads back (with resharding onto any mesh). The target is written to a temporary
        sibling folder and only then moved into place. A quantized model (:meth:`quantize`) is refused."""
        if self.quantized is not None:
            raise ValueError(f"save_pretrained({path!r}): the model is quantized ({self.quantized}): save the float "
                             f"model and quantize after loading (VitaModel.quantize, --quantize {self.quantized})")
        tok_dir = os.path.dirname(self.tokenizer.path) if self.tokenizer is not None and self.tokenizer.path else None
        release.check_target(path, self.path, tok_dir)
        speech = self.speech
        extra = None if speech is None else (lambda tmp: speech.save(os.path.join(tmp, "vita_tts_ckpt")))
        if format == "pytorch":
            return pytorch.save(path, self.config, self.params, self.source_dtypes, self.path, tok_dir, extra,
                                max_shard_bytes=max_shard_bytes, overwrite=overwrite)
        if format == "orbax":
            return orbax_io.save(path, self.config, self.params, self.source_dtypes, (self.path, tok_dir), extra,
                                 overwrite=overwrite)
        raise ValueError(f"format must be 'pytorch' or 'orbax', got {format!r}")


def init_model(config, seed: int = 0, mesh=None, tokenizer=None) -> VitaModel:
    """A randomly initialised model for ``config`` (e.g. ``config_lib.load_config("tiny")``), each
    part created directly in its shards when a mesh is given."""
    return VitaModel(config, vita_lib.init_params(config, seed, mesh), tokenizer, mesh)


def from_pretrained(path: str, dtype=jnp.float32, mesh=None, config_overrides: Optional[dict] = None,
                    strict: bool = True, adapters: Optional[str] = None) -> VitaModel:
    """Loads an official-layout release folder (``config.json`` + safetensors index + shards, the
    vision and audio-encoder folders, tokenizer files, ``vita_tts_ckpt``) or a vita_jax orbax
    checkpoint.

    Parameters are stored and computed in ``dtype``; with a ``mesh`` every tensor is read once and
    placed straight into its shards. ``config_overrides`` maps dotted config fields to values
    (e.g. ``{"remat_policy": "full"}``). ``strict``: unknown tensors in the shards are an error.
    ``adapters``: a LoRA adapter-only checkpoint (a LoRA stage's export with ``config.lora.merge = False``),
    merged into the weights; ``path`` may also be such a checkpoint, which names its base."""
    ck = model_checkpoint.load(path, dtype, mesh, config_overrides, strict, adapters=adapters)
    speech = None if ck.tts is None else SpeechModel(*ck.tts, path=os.path.join(path, "vita_tts_ckpt"))
    return VitaModel(ck.config, ck.params, ck.tokenizer, mesh, ck.keys_read, ck.source_dtypes, ck.path, speech)
