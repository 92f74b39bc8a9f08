"""The public entry point: :func:`from_pretrained` and the :class:`VitaModel` it returns."""
from __future__ import annotations

import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vita_jax import config as config_lib
from vita_jax import parallel
from vita_jax.convert import loader
from vita_jax.convert.safetensors_io import SafetensorsReader
from vita_jax.convert.torch_io import TorchReader
from vita_jax.data import audio as audio_lib
from vita_jax.data import image as image_lib
from vita_jax.data import video as video_lib
from vita_jax.infer import generate as gen
from vita_jax.models import internvit, projectors, qwen2, whale

IMAGE_TOKEN_INDEX = -200
AUDIO_TOKEN_INDEX = -500


def llm_config(config: ml_collections.ConfigDict) -> qwen2.Qwen2Config:
    impl = None if config.attention_impl == "auto" else config.attention_impl
    return qwen2.Qwen2Config.from_config(config.llm, dtype=config.dtype, param_dtype=config.param_dtype,
                                         remat_policy=config.remat_policy, attention_impl=impl)


def vision_config(config: ml_collections.ConfigDict) -> internvit.InternViTConfig:
    return internvit.InternViTConfig.from_config(config.vision, dtype=config.dtype, param_dtype=config.param_dtype,
                                                 remat_policy=config.remat_policy)


def audio_config(config: ml_collections.ConfigDict) -> whale.WhaleConfig:
    return whale.WhaleConfig.from_config(config.audio, dtype=config.dtype, param_dtype=config.param_dtype,
                                         remat_policy=config.remat_policy)


def build_parts(config: ml_collections.ConfigDict) -> dict:
    """name -> ``(module, example input, key table)`` for every part of the model that the config
    has. The parameter tree of the whole model is ``{name: part params}``."""
    lc = llm_config(config)
    parts = {"llm": (qwen2.Qwen2ForCausalLM(lc), jnp.zeros((1, 8), jnp.int32), qwen2.key_table(lc))}
    if config.has_vision:
        vc = vision_config(config)
        parts["vision_tower"] = (internvit.InternViT(vc), jnp.zeros((1, 3, vc.image_size, vc.image_size)),
                                 internvit.key_table(vc, VISION_PREFIX))
        parts["mm_projector"] = (projectors.MLPProjector(lc.hidden_size, lc.dtype, lc.param_dtype),
                                 jnp.zeros((1, 1, config.mm_hidden_size)), projectors.projector_key_table())
    if config.has_audio:
        ac = audio_config(config)
        parts["audio_encoder"] = (whale.WhaleAudioEncoder(ac), (jnp.zeros((1, 16, ac.input_dim)), jnp.array([16])),
                                  whale.key_table(ac))
    return parts


VISION_PREFIX = "model.vision_tower.vision_tower."


def abstract_params(module, example=None):
    """Boxed (logically partitioned) abstract parameter tree of ``module``."""
    example = jnp.zeros((1, 8), jnp.int32) if example is None else example
    args = example if isinstance(example, tuple) else (example,)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args)["params"])


def init_params(module, mesh=None, seed: int = 0, example=None):
    """Random parameters, created directly in their sharded slots when a mesh is given."""
    example = jnp.zeros((1, 8), jnp.int32) if example is None else example

    args = example if isinstance(example, tuple) else (example,)

    def init(key):
        return module.init(key, *args)["params"]
    key = jax.random.PRNGKey(seed)
    if mesh is None:
        return nn.unbox(jax.jit(init)(key))
    return parallel.sharded_init(init, mesh, key)[0]


def load_tokenizer(directory: str):
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` in ``directory``, or None if absent."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        return None
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{path}: cannot load tokenizer: {e}") from e


class VitaModel:
    """A loaded model. ``config`` (ConfigDict), ``params`` (Flax tree, LLM under ``llm``),
    ``tokenizer`` (or None), ``mesh`` (or None)."""

    def __init__(self, config, params, tokenizer=None, mesh=None, keys_read=()):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.keys_read = list(keys_read)
        self.llm_cfg = llm_config(config)
        self.llm = qwen2.Qwen2ForCausalLM(self.llm_cfg)
        self._forward = jax.jit(self._forward_impl)
        self.image_processor = image_lib.ImageProcessorConfig(
            size=config.image.size, crop_size=config.image.crop_size, mean=tuple(config.image.mean),
            std=tuple(config.image.std), resample=config.image.resample)
        if config.has_vision:
            self.vit_cfg = vision_config(config)
            self.vit = internvit.InternViT(self.vit_cfg)
            self.projector = projectors.MLPProjector(self.llm_cfg.hidden_size, self.llm_cfg.dtype,
                                                     self.llm_cfg.param_dtype)
            self._encode_images = jax.jit(self._encode_images_impl)
        if config.has_audio:
            self.whale_cfg = audio_config(config)
            self.whale = whale.WhaleAudioEncoder(self.whale_cfg)
            self._encode_audio = jax.jit(self._encode_audio_impl)

    # ------------------------------------------------------------------ vision
    def _encode_images_impl(self, params, pixels):
        feats = self.vit.apply({"params": params["vision_tower"]}, pixels)
        feats = projectors.pixel_shuffle(feats, 0.5)
        return self.projector.apply({"params": params["mm_projector"]}, feats).astype(jnp.float32)

    def preprocess_image(self, image, max_num: Optional[int] = None) -> np.ndarray:
        """A PIL image or path -> float32 ``[tiles, 3, S, S]`` (dynamic tiling + CLIP processor)."""
        im = self.config.image
        return image_lib.preprocess_image(image, self.image_processor,
                                          max_num=im.max_dynamic_patch if max_num is None else max_num,
                                          min_num=im.min_dynamic_patch, use_thumbnail=im.use_thumbnail)

    def preprocess_video(self, path: str, video_fps: Optional[float] = None) -> np.ndarray:
        """A video file -> float32 ``[frames, 3, S, S]`` (4..16 frames, one tile each)."""
        im = self.config.image
        return video_lib.preprocess_video(path, self.image_processor, im.video_fps if video_fps is None else video_fps,
                                          im.video_max_frames, im.video_min_frames)

    # ------------------------------------------------------------------ speech
    def audio_features(self, waveform, sample_rate: Optional[int] = None) -> np.ndarray:
        """A waveform (float in [-1, 1] or int16, any rate, mono or stereo) or an audio file path ->
        float32 Kaldi fbank ``[frames, 80]`` before CMVN (dither from the config, 0 by default)."""
        return audio_lib.audio_features(waveform, sample_rate, dither=self.config.audio.dither,
                                        num_mel_bins=self.config.audio.input_dim)

    def _encode_audio_impl(self, params, feats, lengths):
        out = self.whale.apply({"params": params}, feats, lengths)
        return out["embeds"].astype(jnp.float32), out["mask"]

    def encode_audio(self, features, lengths):
        """Zero-padded fbank ``[clips, frames, 80]`` (before CMVN) and ``lengths [clips]`` ->
        ``(embeddings [clips, T, llm_width], lengths_for_llm [clips])``. Rows past a clip's
        ``lengths_for_llm`` are padding. Frames and clips are padded to buckets internally."""
        if not self.config.has_audio:
            raise ValueError("this model has no audio encoder (config.json names no mm_audio_encoder)")
        feats = np.asarray(features, np.float32)
        if feats.ndim == 2:
            feats = feats[None]
        lengths = np.asarray(lengths, np.int64).reshape(-1)
        if feats.ndim != 3 or feats.shape[2] != self.whale_cfg.input_dim or lengths.shape[0] != feats.shape[0]:
            raise ValueError(f"features must be [clips, frames, {self.whale_cfg.input_dim}] with one length per clip, "
                             f"got {feats.shape} and {lengths.shape[0]} lengths")
        if (lengths < 7).any() or (lengths > feats.shape[1]).any():
            raise ValueError(f"audio lengths {lengths.tolist()} must be within 7..{feats.shape[1]} frames "
                             "(7 frames = 85 ms is the shortest clip that gives one LLM token)")
        max_frames = 4 * self.whale_cfg.max_positions + 3
        if lengths.max() > max_frames:
            raise ValueError(f"an audio clip of {int(lengths.max())} frames ({lengths.max() / 100:.1f} s) exceeds the "
                             f"encoder's {self.whale_cfg.max_positions}-row position table (at most {max_frames} frames)")
        n = feats.shape[0]
        t = min(-(-feats.shape[1] // 64) * 64, max_frames)
        dp = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        bucket = -(-max(1 << (n - 1).bit_length(), dp) // dp) * dp
        padded = np.zeros((bucket, t, feats.shape[2]), np.float32)
        padded[:n, :feats.shape[1]] = feats
        lens = np.full((bucket,), t, np.int32)
        lens[:n] = lengths
        with parallel.use_mesh(self.mesh):
            emb, _ = self._encode_audio(self.params["audio_encoder"], self._place(padded), self._place(lens))
        llm_len = audio_lib.llm_length(lengths).astype(np.int32)
        return np.asarray(emb)[:n, :int(llm_len.max())], llm_len

    # ------------------------------------------------------------------ vision
    def encode_images(self, pixel_values) -> np.ndarray:
        """``[tiles, 3, S, S]`` -> projector output ``[tiles, tokens_per_tile, llm_width]`` (float32).
        Tiles are padded to a bucket (power of two, multiple of the data-parallel size) so that
        few shapes are compiled; with a mesh they are sharded over the batch axes."""
        if not self.config.has_vision:
            raise ValueError("this model has no vision tower (config.json names no mm_vision_tower)")
        pixels = np.asarray(pixel_values, np.float32)
        s = self.vit_cfg.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixel_values must be [tiles, 3, H, W], got shape {pixels.shape}")
        n = pixels.shape[0]
        if n == 0:
            return np.zeros((0, (s // self.vit_cfg.patch_size // 2) ** 2, self.llm_cfg.hidden_size), np.float32)
        dp = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        bucket = max(1 << (n - 1).bit_length(), dp)
        bucket = -(-bucket // dp) * dp
        pixels = np.concatenate([pixels, np.zeros((bucket - n,) + pixels.shape[1:], np.float32)])
        with parallel.use_mesh(self.mesh):
            out = self._encode_images(self.params, self._place(pixels))
        return np.asarray(out)[:n]

    def _forward_impl(self, params, input_ids, attention_mask):
        logits, _ = self.llm.apply({"params": params}, input_ids=input_ids, attention_mask=attention_mask)
        return logits.astype(jnp.float32)

    def _check_text_only(self, input_ids, pixel_values, audio_features):
        if pixel_values is not None or audio_features is not None or (np.asarray(input_ids) < 0).any():
            raise NotImplementedError(
                "image/audio inputs (placeholders -200/-500, pixel_values, audio_features) need the vision "
                "and speech towers, which this version of vita_jax does not have yet; pass text ids >= 0")

    def _place(self, x):
        x = jnp.asarray(x)
        if self.mesh is None:
            return x
        return jax.device_put(x, parallel.data_sharding(self.mesh, x.ndim, shape=x.shape))

    def forward(self, input_ids, attention_mask=None, pixel_values=None, audio_features=None,
                audio_lengths=None) -> np.ndarray:
        """``input_ids [batch, length]`` -> float32 logits ``[batch, length, vocab]`` (numpy)."""
        input_ids = np.asarray(input_ids)
        self._check_text_only(input_ids, pixel_values, audio_features)
        if attention_mask is None:
            attention_mask = np.ones_like(input_ids)
        with parallel.use_mesh(self.mesh):
            out = self._forward(self.params["llm"], self._place(input_ids.astype(np.int32)),
                                self._place(np.asarray(attention_mask, np.int32)))
        return np.asarray(out)

    def generate(self, input_ids, attention_mask=None, pixel_values=None, audio_features=None,
                 audio_lengths=None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop_ids=None, vocab_limit: Optional[int] = None) -> np.ndarray:
        """Greedy or sampled continuation: ``[batch, length]`` -> new ids ``[batch, n]`` (padding
        after a row's stop token is -1). ``stop_ids`` defaults to the config's eos id."""
        input_ids = np.asarray(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        self._check_text_only(input_ids, pixel_values, audio_features)
        if stop_ids is None:
            stop_ids = [self.config.eos_token_id] if self.config.eos_token_id >= 0 else []
        with parallel.use_mesh(self.mesh):
            return gen.generate(self.llm, self.params["llm"], self.llm_cfg, self._place(input_ids.astype(np.int32)),
                                None if attention_mask is None else self._place(np.asarray(attention_mask)),
                                max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids, vocab_limit=vocab_limit)


def from_pretrained(path: str, dtype=jnp.float32, mesh=None, config_overrides: Optional[dict] = None) -> VitaModel:
    """Loads an official-layout release folder (``config.json`` + safetensors index + shards).

    Parameters are stored and computed in ``dtype``; with a ``mesh`` every tensor is read once and
    placed straight into its shards. ``config_overrides`` maps dotted config fields to values
    (e.g. ``{"remat_policy": "full"}``)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    config = config_lib.from_release(path)
    config.dtype = config.param_dtype = jnp.dtype(dtype).name
    for k, v in (config_overrides or {}).items():
        config_lib.apply_override(config, k, str(v))
    reader = SafetensorsReader(path)
    params, keys = {}, []
    for name, (module, example, rules) in build_parts(config).items():
        boxed = abstract_params(module, example)
        shardings = nn.unbox(parallel.param_shardings(boxed, mesh)) if mesh is not None else None
        src = reader
        if name == "vision_tower" and rules[0].torch_key not in reader:
            src, rules = _vision_fallback(config, path, module, rules)
        if name == "audio_encoder" and rules[-1].torch_key not in reader:
            src, rules = _audio_fallback(config, path)
        params[name], got = loader.load(rules, src, nn.unbox(boxed), shardings)
        keys += got
    return VitaModel(config, params, load_tokenizer(path), mesh, keys)


def _audio_fallback(config, path):
    """As for the ViT: the audio encoder folder's ``final.pt`` when the shards lack the encoder."""
    pt = os.path.join(path, config.mm_audio_encoder, "final.pt")
    if not os.path.exists(pt):
        raise loader.CheckpointError(f"the audio encoder tensors are missing from {path} and {pt} does not exist")
    return TorchReader(pt), whale.key_table(audio_config(config), prefix="")


def _vision_fallback(config, path, module, rules):
    """The official constructor first loads the ViT from the ``mm_vision_tower`` folder and then
    lets the shards overwrite it; when the shards hold no ViT tensors, the folder's are used."""
    folder = os.path.join(path, config.mm_vision_tower)
    if not os.path.exists(os.path.join(folder, "model.safetensors")) and \
            not os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
        raise loader.CheckpointError(f"tensor {rules[0].torch_key!r} is missing from {path} and the vision folder "
                                     f"{folder} has no weights either")
    return SafetensorsReader(folder), internvit.key_table(vision_config(config), "")
