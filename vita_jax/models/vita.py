"""The VITA-1.5 omni model: vision and speech features spliced into the Qwen2 sequence, and the
official loss.

Splicing is planned on the host (:func:`plan_splice`, numpy) exactly as the official
``prepare_inputs_labels_for_multimodal`` lays the sequence out: padding removed with the attention
mask, each ``-200`` replaced by the next tile's tokens (one global tile counter over the batch),
each ``-500`` by the next clip's adapter rows truncated to its ``lengths_for_llm``, inserted rows
labelled -100, each row cut to ``max_length`` *after* splicing, then right-padded. The plan is a set
of static-shape index arrays (``kind`` / ``src`` / ``text_ids``), so the jitted model gathers the
features into place without any data-dependent shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vita_jax import parallel
from vita_jax.models import internvit, projectors, qwen2, whale

IMAGE_TOKEN_INDEX, AUDIO_TOKEN_INDEX, IGNORE_INDEX = -200, -500, -100
TEXT, IMAGE, AUDIO, PAD = 0, 1, 2, -1


@dataclasses.dataclass
class SplicePlan:
    """Per spliced position (``[batch, length]``): ``kind`` (0 text, 1 image, 2 audio, -1 pad),
    ``text_ids`` (the id for text rows, else 0), ``src`` (row of the flattened image features
    ``[tiles * tokens_per_tile]`` or audio features ``[clips * audio_len]``), ``labels`` (or None)
    and ``lengths [batch]`` (real positions per row)."""
    kind: np.ndarray
    text_ids: np.ndarray
    src: np.ndarray
    labels: Optional[np.ndarray]
    lengths: np.ndarray

    @property
    def attention_mask(self) -> np.ndarray:
        return (self.kind != PAD).astype(np.int32)


def plan_splice(input_ids, attention_mask=None, labels=None, *, tokens_per_tile: int = 256,
                audio_llm_lengths: Sequence[int] = (), audio_len: int = 0, max_length: int = 6200,
                pad_to: Optional[int] = None, n_tiles: Optional[int] = None) -> SplicePlan:
    """Host-side layout of the spliced batch. ``audio_len`` is the (padded) time axis of the audio
    features the model will produce; ``pad_to`` rounds the length up (jit buckets)."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    lab = None if labels is None else np.asarray(labels)
    rows, tile, clip = [], 0, 0
    for b in range(ids.shape[0]):
        row_ids = ids[b][mask[b]]
        row_lab = lab[b][mask[b]] if lab is not None else np.full(row_ids.shape, IGNORE_INDEX)
        kind, text, src, out_lab = [], [], [], []
        for t, tok in enumerate(row_ids):
            if tok == IMAGE_TOKEN_INDEX:
                if n_tiles is not None and tile >= n_tiles:
                    raise ValueError(f"row {b}: more <image> placeholders than the {n_tiles} image tiles given")
                kind += [IMAGE] * tokens_per_tile
                src += list(range(tile * tokens_per_tile, (tile + 1) * tokens_per_tile))
                text += [0] * tokens_per_tile
                out_lab += [IGNORE_INDEX] * tokens_per_tile
                tile += 1
            elif tok == AUDIO_TOKEN_INDEX:
                if clip >= len(audio_llm_lengths):
                    raise ValueError(f"row {b}: more <audio> placeholders than the {len(audio_llm_lengths)} clips given")
                n = int(audio_llm_lengths[clip])
                kind += [AUDIO] * n
                src += list(range(clip * audio_len, clip * audio_len + n))
                text += [0] * n
                out_lab += [IGNORE_INDEX] * n
                clip += 1
            elif tok < 0:
                raise ValueError(f"row {b}: unknown placeholder id {int(tok)} (only -200 image, -500 audio)")
            else:
                kind.append(TEXT)
                src.append(0)
                text.append(int(tok))
                out_lab.append(int(row_lab[t]))
        rows.append([np.asarray(a[:max_length]) for a in (kind, text, src, out_lab)])
    if n_tiles is not None and tile != n_tiles:
        raise ValueError(f"{n_tiles} image tiles given but the ids hold {tile} <image> placeholders")
    if clip != len(audio_llm_lengths):
        raise ValueError(f"{len(audio_llm_lengths)} audio clips given but the ids hold {clip} <audio> placeholders")
    lengths = np.asarray([len(r[0]) for r in rows], np.int32)
    L = int(lengths.max()) if len(rows) else 0
    if pad_to:
        L = -(-max(L, 1) // pad_to) * pad_to
    out = [np.full((len(rows), L), fill, dtype) for fill, dtype in ((PAD, np.int8), (0, np.int32), (0, np.int32),
                                                                      (IGNORE_INDEX, np.int32))]
    for b, r in enumerate(rows):
        for arr, vals in zip(out, r):
            arr[b, :len(vals)] = vals
    return SplicePlan(out[0], out[1], out[2], out[3] if lab is not None else None, lengths)


def lm_loss_terms(logits, labels):
    """Official loss pieces: ``(sum of CE over targets != -100, their count)`` for
    ``logits[:, :-1]`` against ``labels[:, 1:]`` (float32)."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


class VITA(nn.Module):
    """The whole model; parameter tree ``{llm, vision_tower, mm_projector, audio_encoder}``."""
    llm_cfg: qwen2.Qwen2Config
    vit_cfg: Optional[internvit.InternViTConfig] = None
    whale_cfg: Optional[whale.WhaleConfig] = None

    def setup(self):
        self.llm = qwen2.Qwen2ForCausalLM(self.llm_cfg)
        if self.vit_cfg is not None:
            self.vision_tower = internvit.InternViT(self.vit_cfg)
            self.mm_projector = projectors.MLPProjector(self.llm_cfg.hidden_size, self.llm_cfg.dtype,
                                                        self.llm_cfg.param_dtype)
        if self.whale_cfg is not None:
            self.audio_encoder = whale.WhaleAudioEncoder(self.whale_cfg)

    def encode_images(self, pixels):
        """``[tiles, 3, S, S]`` -> ``[tiles, tokens_per_tile, embed]``."""
        feats = projectors.pixel_shuffle(self.vision_tower(pixels), 0.5)
        return self.mm_projector(feats)

    def encode_audio(self, features, lengths):
        """``[clips, T, 80]``, ``[clips]`` -> adapter rows ``[clips, T'', embed]``."""
        return self.audio_encoder(features, lengths)["embeds"]

    def embed(self, kind, text_ids, src, pixels=None, audio_features=None, audio_lengths=None):
        """Spliced input embeddings ``[batch, length, embed]`` (zeros on padding)."""
        x = self.llm.embed(text_ids)
        # a batch laid out with no tile / clip slots (static shapes) skips that tower entirely
        if pixels is not None and pixels.shape[0]:
            img = self.encode_images(pixels).astype(x.dtype)
            img = img.reshape(-1, img.shape[-1])
            x = jnp.where((kind == IMAGE)[..., None], jnp.take(img, src, axis=0, mode="clip"), x)
        if audio_features is not None and audio_features.shape[0]:
            aud = self.encode_audio(audio_features, audio_lengths).astype(x.dtype)
            aud = aud.reshape(-1, aud.shape[-1])
            x = jnp.where((kind == AUDIO)[..., None], jnp.take(aud, src, axis=0, mode="clip"), x)
        x = jnp.where((kind == PAD)[..., None], 0.0, x)
        return parallel.constrain(x, ("batch", "length", "act_embed"))

    def __call__(self, kind, text_ids, src, pixels=None, audio_features=None, audio_lengths=None):
        """Logits ``[batch, length, vocab]`` over the spliced sequence (positions 0..L-1)."""
        x = self.embed(kind, text_ids, src, pixels, audio_features, audio_lengths)
        logits, _ = self.llm(inputs_embeds=x, attention_mask=(kind != PAD).astype(jnp.int32))
        return logits
