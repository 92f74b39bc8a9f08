"""The official release directory: which parts it holds, their key tables, and reading it
tensor by tensor into a (sharded) Flax tree.

Layout (``VITA-MLLM/VITA-1.5``): ``config.json``, ``model.safetensors.index.json`` + shards (LLM,
ViT, projector, audio encoder + adapter, CMVN buffers), tokenizer files, the folder ``mm_vision_tower``
names (InternViT ``config.json`` / ``preprocessor_config.json`` / weights) or the hub id, the folder
``mm_audio_encoder`` names (``train.yaml``, ``global_cmvn``, ``final.pt``), optional ``vita_tts_ckpt/``.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp

from vita_jax import config as config_lib
from vita_jax import parallel
from vita_jax.convert import loader
from vita_jax.convert.safetensors_io import CheckpointError, SafetensorsReader
from vita_jax.convert.torch_io import TorchReader
from vita_jax.models import internvit, projectors, qwen2, whale

VISION_PREFIX = "model.vision_tower.vision_tower."


def build_parts(config) -> dict:
    """name -> ``(module, example inputs, key table)`` for every part the config has; the model's
    parameter tree is ``{name: part params}`` (the names of :class:`vita_jax.models.vita.VITA`)."""
    lc = config_lib.llm_config(config)
    parts = {"llm": (qwen2.Qwen2ForCausalLM(lc), (jnp.zeros((1, 8), jnp.int32),), qwen2.key_table(lc))}
    vc = config_lib.vision_config(config)
    if vc is not None:
        parts["vision_tower"] = (internvit.InternViT(vc), (jnp.zeros((1, 3, vc.image_size, vc.image_size)),),
                                 internvit.key_table(vc, VISION_PREFIX))
        parts["mm_projector"] = (projectors.MLPProjector(lc.hidden_size, lc.dtype, lc.param_dtype),
                                 (jnp.zeros((1, 1, config.mm_hidden_size)),), projectors.projector_key_table())
    ac = config_lib.audio_config(config)
    if ac is not None:
        parts["audio_encoder"] = (whale.WhaleAudioEncoder(ac), (jnp.zeros((1, 16, ac.input_dim)), jnp.array([16])),
                                  whale.key_table(ac))
    return parts


def abstract_part(module, example) -> dict:
    """Boxed (logically partitioned) abstract parameters of one part."""
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *example)["params"])


def load(path: str, config, mesh=None, strict: bool = True):
    """Reads every part from ``path``. Returns ``(params, keys_read, source_dtypes)`` where
    ``source_dtypes`` maps each official key to its stored dtype (kept for export).

    Every tensor is shape-checked against the model before any data is read; with ``strict`` an
    official key that no part consumes is an error (it would otherwise be silently dropped)."""
    reader = SafetensorsReader(path)
    parts = build_parts(config)
    plans, used = {}, set()
    for name, (module, example, rules) in parts.items():
        boxed = abstract_part(module, example)
        src = reader
        if name == "vision_tower" and rules[0].torch_key not in reader:
            src, rules = _vision_fallback(config, path)
        if name == "audio_encoder" and rules[-1].torch_key not in reader:
            src, rules = _audio_fallback(config, path)
        _, keys = loader.check(rules, src, nn.unbox(boxed))
        plans[name] = (boxed, src, rules)
        if src is reader:
            used.update(keys)
    if strict:
        extra = sorted(set(reader.keys()) - used)
        if extra:
            raise CheckpointError(f"{reader.source}: {len(extra)} tensor(s) that this model does not have, e.g. "
                                  f"{extra[:5]} (a different architecture or a corrupted index?)")
    params, keys, dtypes = {}, [], {}
    for name, (boxed, src, rules) in plans.items():
        shardings = nn.unbox(parallel.param_shardings(boxed, mesh)) if mesh is not None else None
        params[name], got = loader.load(rules, src, nn.unbox(boxed), shardings)
        keys += got
        if src is reader:
            dtypes.update({k: reader.dtype(k) for k in got})
    return params, keys, dtypes


def _vision_fallback(config, path):
    """The official constructor first loads the ViT from the ``mm_vision_tower`` folder and then
    lets the shards overwrite it; when the shards hold no ViT tensors, the folder's are used."""
    folder = os.path.join(path, config.mm_vision_tower)
    if not any(os.path.exists(os.path.join(folder, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
        raise CheckpointError(f"tensor {VISION_PREFIX}embeddings.class_embedding is missing from {path} and the "
                              f"vision folder {folder} has no weights either")
    return SafetensorsReader(folder), internvit.key_table(config_lib.vision_config(config), "")


def _audio_fallback(config, path):
    """As for the ViT: the audio encoder folder's ``final.pt`` when the shards lack the encoder."""
    pt = os.path.join(path, config.mm_audio_encoder, "final.pt")
    if not os.path.exists(pt):
        raise CheckpointError(f"the audio encoder tensors are missing from {path} and {pt} does not exist")
    return TorchReader(pt), whale.key_table(config_lib.audio_config(config), prefix="")
