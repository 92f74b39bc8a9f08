"""Adapter-only checkpoints of a LoRA run (``config.lora.merge = False``): a vita_jax checkpoint folder whose
``params/`` hold the adapters alone (``{part: {.../kernel_lora_a, .../kernel_lora_b}}``) and whose
``vita_jax.json`` names the base they were trained on (``"lora_adapters": {"base": PATH}``). Megabytes
instead of the model's gigabytes; any loader (:func:`vita_jax.convert.model_checkpoint.load`, hence
``from_pretrained``, ``convert``, ``eval``, ``serve``) takes such a folder and merges it into its base."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import traverse_util

from vita_jax import parallel, paths
from vita_jax.convert import orbax_io
from vita_jax.convert.safetensors_io import CheckpointError
from vita_jax.convert.target import ORBAX_META
from vita_jax.models import lora, vita

KEY = "lora_adapters"


def _meta(path: str):
    try:
        with paths.open(paths.join(path, ORBAX_META)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_adapters(path: str) -> bool:
    meta = _meta(path)
    return isinstance(meta, dict) and KEY in meta


def base_of(path: str) -> str:
    """The base model folder an adapter checkpoint names ("" when it names none)."""
    return str((_meta(path) or {}).get(KEY, {}).get("base", ""))


def save(dst: str, config, params: dict, overwrite: bool = True) -> None:
    """The adapters of ``params`` (a whole-model tree with adapter leaves) to ``dst``, naming
    ``config.init_from`` as their base."""
    flat = lora.adapters_of(params)
    if not flat:
        raise ValueError("no LoRA adapters to save (config.lora.rank = 0?)")
    orbax_io.save(dst, config, traverse_util.unflatten_dict(flat, sep="/"), overwrite=overwrite,
                  meta_extra={KEY: {"base": str(config.init_from)}})


def load(path: str, mesh=None):
    """``(config, spec, modules, adapters)`` of an adapter checkpoint, restored into the shardings of ``mesh``
    (or the default device)."""
    meta = _meta(path)
    try:
        config = ml_collections.ConfigDict(meta["config"])
        spec = lora.spec_of(config)
        parts = vita.parts(config)
        boxed = {n: vita.abstract_part(p.module, p.example) for n, p in parts.items()}
        modules = lora.target_modules(spec, boxed)
        abstract = lora.abstract_adapters(spec, lora.init_parts(config), modules)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/{ORBAX_META}: not a LoRA adapter checkpoint ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0]})") from e
    if mesh is not None:
        sh = nn.unbox(parallel.param_shardings(abstract, mesh))
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sh = jax.tree.map(lambda _: dev, nn.unbox(abstract))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract), sh)
    try:
        adapters = ocp.StandardCheckpointer().restore(paths.for_orbax(paths.join(path, "params")), target)
    except Exception as e:
        raise CheckpointError(f"{path}/params: cannot restore the LoRA adapters: {(str(e).splitlines() or [''])[0]}") \
            from e
    return config, spec, modules, adapters


def attach(path: str, base_config, params: dict, mesh=None) -> dict:
    """``params`` (a base model) with the adapters of ``path`` merged into their kernels (in each kernel's
    dtype). The adapters' model must be the base's (the LLM and tower sizes)."""
    config, spec, _, adapters = load(path, mesh)
    for field in ("llm", "vision", "audio", "has_vision", "has_audio"):
        a, b = config.get(field), base_config.get(field)
        a = a.to_dict() if hasattr(a, "to_dict") else a
        b = b.to_dict() if hasattr(b, "to_dict") else b
        if a != b:
            raise CheckpointError(f"{path}: LoRA adapters of another model (config.{field} differs from the base's)")
    flat = traverse_util.flatten_dict(params, sep="/")
    flat.update(traverse_util.flatten_dict(adapters, sep="/"))
    return lora.merge(traverse_util.unflatten_dict(flat, sep="/"), spec)
