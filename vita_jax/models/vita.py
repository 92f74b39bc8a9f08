"""The VITA-1.5 omni model: its assembly from a config, initialisation, the splicing contract and
the official loss.

Assembly: the config's ``llm`` / ``vision`` / ``audio`` / ``tts`` sections become the tower configs
here and nowhere else (:func:`llm_config`, :func:`vision_config`, :func:`audio_config`,
:func:`tts_config`); :func:`parts` lists the model's parts with their example inputs and key tables
(the parameter tree is ``{part: params}``); :meth:`VITA.from_config` builds the whole model and
:func:`init_params` initialises it (sharded when a mesh is given), :func:`init_heads` the stage
heads (CTC head, speech decoder).

Splicing contract: the host lays the sequence out (``vita_jax.data.batch.plan_splice``) as the
official ``prepare_inputs_labels_for_multimodal`` does, as static-shape index arrays ``kind`` /
``src`` / ``text_ids`` over the spliced positions; the jitted model gathers tile and clip features
into place with no data-dependent shapes. The placeholder ids, the ignore index and the position
kinds are defined here, once.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vita_jax import parallel
from vita_jax.models import ctc, internvit, lm_loss, projectors, qwen2, splice, tts_decoder, whale

# placeholder ids in ``input_ids`` (one per tile / clip), the label of unsupervised positions
IMAGE_TOKEN_INDEX, AUDIO_TOKEN_INDEX, IGNORE_INDEX = -200, -500, -100
# what a spliced position holds (defined beside the splice)
TEXT, IMAGE, AUDIO, PAD = splice.TEXT, splice.IMAGE, splice.AUDIO, splice.PAD
VISION_PREFIX = "model.vision_tower.vision_tower."


def lm_loss_terms(logits, labels):
    """Official loss pieces ``(sum of CE over targets != -100, their count)`` of logits in hand
    ``[batch, L, vocab]`` for ``logits[:, :-1]`` against ``labels[:, 1:]`` (float32)."""
    total, (count, _) = lm_loss.loss_terms(logits, labels, ignore_index=IGNORE_INDEX)
    return total, count


def lm_row_terms(module: "VITA", params, labels, *args, rngs=None):
    """Per row ``(sum of CE, target count, argmax hits)`` of ``module`` on spliced inputs ``args``
    (those of :meth:`VITA.__call__`) against ``labels [batch, L]``; the LM head runs
    ``module.loss_chunk`` positions at a time (:mod:`vita_jax.models.lm_loss`), no full logits. ``rngs``:
    ``{"dropout": key}`` for LoRA adapters with dropout."""
    h = module.apply({"params": params}, *args, method="hidden", rngs=rngs)
    head = lambda x: module.apply({"params": params}, x, method="head", rngs=rngs)  # noqa: E731
    return lm_loss.row_terms(h, labels, head, module.loss_chunk, IGNORE_INDEX)


# ------------------------------------------------------------------------------ tower configs
def llm_config(config) -> qwen2.Qwen2Config:
    return qwen2.Qwen2Config.from_config(config.llm, dtype=config.dtype, param_dtype=config.param_dtype,
                                         remat_policy=config.remat_policy, attention_impl=config.attention_impl)


def vision_config(config) -> Optional[internvit.InternViTConfig]:
    if not config.has_vision:
        return None
    return internvit.InternViTConfig.from_config(config.vision, dtype=config.dtype, param_dtype=config.param_dtype,
                                                 remat_policy=config.get("vision_remat_policy") or config.remat_policy)


def audio_config(config) -> Optional[whale.WhaleConfig]:
    if not config.has_audio:
        return None
    # the adapter always projects to the LLM width (a train.yaml that disagrees is rejected on load)
    return whale.WhaleConfig.from_config(config.audio, dtype=config.dtype, param_dtype=config.param_dtype,
                                         remat_policy=config.get("audio_remat_policy") or config.remat_policy,
                                         llm_embed_dim=config.llm.hidden_size)


def tts_config(config) -> tts_decoder.TTSDecoderConfig:
    t = config.get("tts", None)
    if t is None:
        raise ValueError("stage 3.2 needs config.tts (the speech decoder's dimensions)")
    return tts_decoder.TTSDecoderConfig(**dict(t))


class VITA(nn.Module):
    """The whole model; parameter tree ``{llm, vision_tower, mm_projector, audio_encoder}``.
    ``pixel_mean`` / ``pixel_std``: the image processor's normalisation (``config.image``), applied
    here to uint8 pixels (:meth:`encode_images`)."""
    llm_cfg: qwen2.Qwen2Config
    vit_cfg: Optional[internvit.InternViTConfig] = None
    whale_cfg: Optional[whale.WhaleConfig] = None
    pixel_mean: tuple = (0.485, 0.456, 0.406)
    pixel_std: tuple = (0.229, 0.224, 0.225)
    loss_chunk: int = 0  # positions per chunk of the LM loss (config.loss_chunk; 0: all at once)

    @classmethod
    def from_config(cls, config) -> "VITA":
        """The model a (ml_collections) config describes."""
        im = config.get("image")
        norm = {} if im is None else dict(pixel_mean=tuple(map(float, im.mean)), pixel_std=tuple(map(float, im.std)))
        return cls(llm_config(config), vision_config(config), audio_config(config),
                   loss_chunk=int(config.get("loss_chunk", 0)), **norm)

    @property
    def tokens_per_tile(self) -> int:
        return self.vit_cfg.tokens_per_tile if self.vit_cfg is not None else 0

    def setup(self):
        self.llm = qwen2.Qwen2ForCausalLM(self.llm_cfg)
        if self.vit_cfg is not None:
            self.vision_tower = internvit.InternViT(self.vit_cfg)
            self.mm_projector = projectors.MLPProjector(self.llm_cfg.hidden_size, self.llm_cfg.dtype,
                                                        self.llm_cfg.param_dtype)
        if self.whale_cfg is not None:
            self.audio_encoder = whale.WhaleAudioEncoder(self.whale_cfg)

    def encode_images(self, pixels):
        """``[tiles, 3, S, S]`` -> ``[tiles, tokens_per_tile, embed]``. Pixels are uint8 RGB tiles
        (the host pipeline's: resized and cropped, normalised here, on the device, with the
        processor's mean / std) or floats already normalised (the official ``pixel_values``)."""
        if pixels.dtype == jnp.uint8:  # 4x less host memory and transfer than float32 tiles
            pixels = internvit.normalise_pixels(pixels, self.pixel_mean, self.pixel_std)
        feats = projectors.pixel_shuffle(self.vision_tower(pixels), 0.5)
        return self.mm_projector(feats)

    def encode_audio(self, features, lengths):
        """``[clips, T, 80]``, ``[clips]`` -> adapter rows ``[clips, T'', embed]``."""
        return self.audio_encoder(features, lengths)["embeds"]

    def embed(self, kind, text_ids, src, pixels=None, audio_features=None, audio_lengths=None):
        """Spliced input embeddings ``[batch, length, embed]`` (zeros on padding)."""
        img = []
        # a batch laid out with no tile / clip slots (static shapes) skips that tower entirely
        if pixels is not None and pixels.shape[0]:
            img = [self.encode_images(pixels)]
        # clips: one array [clips, T, mel], or a list of them (packing's clip groups, each its own T): each
        # group is encoded on its own (a clip's result does not depend on its padding), rows laid end to end
        feats = list(zip(audio_features, audio_lengths)) if isinstance(audio_features, (list, tuple)) else \
            [(audio_features, audio_lengths)]
        aud = [self.encode_audio(f, n) for f, n in feats if f is not None and f.shape[0]]
        return self.splice(kind, text_ids, src, img, aud)

    def splice(self, kind, text_ids, src, image_blocks=(), audio_blocks=()):
        """The splice alone: text embeddings with the tower rows put in place -> ``[batch, length, embed]``.
        ``image_blocks``: ``[tiles, tokens_per_tile, embed]`` (one or none); ``audio_blocks``: one ``[slots, T'',
        embed]`` per clip group; ``src`` indexes their rows laid end to end (:mod:`vita_jax.models.splice`:
        on each chip alone when the step says the batch lays media out per shard). A single array (flat rows
        ``[R, embed]`` included, as the server's prompt ladder gives) or None is one block or none."""
        as_blocks = lambda b: [] if b is None else ([b] if hasattr(b, "shape") else list(b))  # noqa: E731
        image_blocks, audio_blocks = as_blocks(image_blocks), as_blocks(audio_blocks)
        x = self.llm.embed(text_ids)
        fn = splice.splice_local if splice.can_splice_locally(x, image_blocks, audio_blocks) else splice.splice_global
        return parallel.constrain(fn(x, kind, src, image_blocks, audio_blocks), ("batch", "length", "act_embed"))

    def hidden(self, kind, text_ids, src, pixels=None, audio_features=None, audio_lengths=None,
               segment_ids=None, positions=None):
        """Final hidden states ``[batch, length, embed]`` over the spliced sequence (the arguments of
        :meth:`__call__`); :meth:`head` makes logits of them."""
        x = self.embed(kind, text_ids, src, pixels, audio_features, audio_lengths)
        h, _ = self.llm.hidden(inputs_embeds=x, attention_mask=(kind != PAD).astype(jnp.int32), positions=positions,
                               segment_ids=segment_ids)
        return h

    def head(self, h):
        """``[batch, length, embed]`` -> logits ``[batch, length, vocab]`` (the LLM's head)."""
        return self.llm.head(h)

    def __call__(self, kind, text_ids, src, pixels=None, audio_features=None, audio_lengths=None,
                 segment_ids=None, positions=None):
        """Logits ``[batch, length, vocab]`` over the spliced sequence (positions 0..L-1); ``pixels``:
        uint8 tiles or normalised floats (:meth:`encode_images`). A packed
        batch gives ``segment_ids [batch, length]`` (1, 2, ... per example, 0 on padding: attention
        stays inside an example) and ``positions`` (rotary positions restarting at each example)."""
        return self.head(self.hidden(kind, text_ids, src, pixels, audio_features, audio_lengths, segment_ids,
                                     positions))


# ------------------------------------------------------------------------------ parts and init
class Part(NamedTuple):
    module: nn.Module
    example: tuple      # inputs that ``module.init`` takes
    key_table: list     # official tensor names (``vita_jax.models.keys.KeyRule``)


def parts(config) -> dict[str, Part]:
    """name -> :class:`Part` for every part the config has; the model's parameter tree is
    ``{name: part params}`` (the submodule names of :class:`VITA`)."""
    lc = llm_config(config)
    out = {"llm": Part(qwen2.Qwen2ForCausalLM(lc), (jnp.zeros((1, 8), jnp.int32),), qwen2.key_table(lc))}
    vc = vision_config(config)
    if vc is not None:
        out["vision_tower"] = Part(internvit.InternViT(vc), (jnp.zeros((1, 3, vc.image_size, vc.image_size)),),
                                   internvit.key_table(vc, VISION_PREFIX))
        out["mm_projector"] = Part(projectors.MLPProjector(lc.hidden_size, lc.dtype, lc.param_dtype),
                                   (jnp.zeros((1, 1, config.mm_hidden_size)),), projectors.projector_key_table())
    ac = audio_config(config)
    if ac is not None:
        out["audio_encoder"] = Part(whale.WhaleAudioEncoder(ac), (jnp.zeros((1, 16, ac.input_dim)), jnp.array([16])),
                                    whale.key_table(ac))
    return out


def abstract_part(module: nn.Module, example: tuple) -> dict:
    """Boxed (logically partitioned) abstract parameters of one part."""
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *example)["params"])


def init_module(module: nn.Module, mesh=None, seed: int = 0, example=None) -> dict:
    """Random parameters of ``module`` (created directly in their sharded slots with a mesh);
    ``example``: its init inputs (a tuple, or one array; default int ids ``[1, 8]``)."""
    args = example if isinstance(example, tuple) else (jnp.zeros((1, 8), jnp.int32) if example is None else example,)

    def init(key):
        return module.init(key, *args)["params"]
    key = jax.random.PRNGKey(seed)
    if mesh is None:
        return nn.unbox(jax.jit(init)(key))
    return parallel.sharded_init(init, mesh, key)[0]


def init_params(config, seed: int = 0, mesh=None) -> dict:
    """Random parameters of every part of ``config``'s model (part ``i`` from ``seed + i``)."""
    return {name: init_module(p.module, mesh, seed + i, p.example) for i, (name, p) in enumerate(parts(config).items())}


def init_heads(config, params: dict, seed: int = 0) -> dict:
    """``params`` plus the heads the stage's loss needs and does not have yet: the CTC head
    (``ctc``, ``config.ctc_units`` units) for stage 2.1a, the speech decoder (``tts_decoder``)
    for stage 3.2."""
    params = dict(params)
    if config.loss == "ctc" and "ctc" not in params:
        f = jnp.zeros((1, 64, config.audio.input_dim))
        module = ctc.WhaleCTC(audio_config(config), int(config.ctc_units))
        params["ctc"] = nn.unbox(module.init(jax.random.PRNGKey(seed), f, jnp.array([64]))["params"]["ctc"])
    if config.loss == "tts" and "tts_decoder" not in params:
        tc = tts_config(config)
        params["tts_decoder"] = nn.unbox(tts_decoder.TTSDecoder(tc).init(
            jax.random.PRNGKey(seed + 1), jnp.zeros((1, 4, tc.idim)), jnp.array([4]), jnp.zeros((1, 2), jnp.int32),
            jnp.array([2]))["params"])
    return params
