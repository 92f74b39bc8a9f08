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
from vita_jax.infer import generate as gen
from vita_jax.models import qwen2

IMAGE_TOKEN_INDEX = -200
AUDIO_TOKEN_INDEX = -500


def llm_config(config: ml_collections.ConfigDict) -> qwen2.Qwen2Config:
    impl = None if config.attention_impl == "auto" else config.attention_impl
    return qwen2.Qwen2Config.from_config(config.llm, dtype=config.dtype, param_dtype=config.param_dtype,
                                         remat_policy=config.remat_policy, attention_impl=impl)


def abstract_params(module, batch: int = 1, length: int = 8):
    """Boxed (logically partitioned) abstract parameter tree of ``module``."""
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    return jax.eval_shape(lambda i: module.init(jax.random.PRNGKey(0), i)["params"], ids)


def init_params(module, mesh=None, seed: int = 0):
    """Random parameters, created directly in their sharded slots when a mesh is given."""
    def init(key):
        return module.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
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
    cfg = llm_config(config)
    module = qwen2.Qwen2ForCausalLM(cfg)
    boxed = abstract_params(module)
    abstract = nn.unbox(boxed)
    shardings = nn.unbox(parallel.param_shardings(boxed, mesh)) if mesh is not None else None
    reader = SafetensorsReader(path)
    llm_params, keys = loader.load(qwen2.key_table(cfg), reader, abstract, shardings)
    return VitaModel(config, {"llm": llm_params}, load_tokenizer(path), mesh, keys)
