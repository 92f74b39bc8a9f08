"""The official weights, both directions: the safetensors shards (+ index) of a release folder and
the tower folders' own weight files, read tensor by tensor into a (sharded) Flax tree, and written
back by walking the same key tables.

Reading checks every shape against the model before any data is read; with ``strict`` an official
key that no part consumes is an error. Writing gathers one Flax leaf at a time to the host, splits
it into per-layer tensors, converts it to the PyTorch layout and casts it to the dtype the source
checkpoint stored (bf16 stays bf16); tensors are packed into shards of at most ``max_shard_bytes``
(host memory peaks near one shard plus one leaf), all inside a temporary sibling folder that
replaces the target only when complete.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vita_jax import config as config_lib
from vita_jax import parallel
from vita_jax.convert import loader, release, target
from vita_jax.convert.safetensors_io import CheckpointError, SafetensorsReader, save_file
from vita_jax.convert.torch_io import TorchReader
from vita_jax.models import internvit, vita, whale


def load_release(path: str, dtype=jnp.float32, mesh=None, overrides: Optional[dict] = None, strict: bool = True):
    """An official release folder -> ``(config, params, keys_read, source_dtypes)``; parameters
    stored in ``dtype``, placed in their shards with a ``mesh``; ``overrides``: dotted config
    fields -> values."""
    config = release.read_config(path)
    config.dtype = config.param_dtype = jnp.dtype(dtype).name
    for k, v in (overrides or {}).items():
        config_lib.apply_override(config, k, str(v))
    params, keys, dtypes = load(path, config, mesh, strict=strict)
    return config, params, keys, dtypes


def load(path: str, config, mesh=None, strict: bool = True):
    """Reads every part from ``path``. Returns ``(params, keys_read, source_dtypes)`` where
    ``source_dtypes`` maps each official key to its stored dtype (kept for export).

    Every tensor is shape-checked against the model before any data is read; with ``strict`` an
    official key that no part consumes is an error (it would otherwise be silently dropped)."""
    reader = SafetensorsReader(path)
    parts = vita.parts(config)
    plans, used = {}, set()
    for name, (module, example, rules) in parts.items():
        boxed = vita.abstract_part(module, example)
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
        raise CheckpointError(f"tensor {vita.VISION_PREFIX}embeddings.class_embedding is missing from {path} and the "
                              f"vision folder {folder} has no weights either")
    return SafetensorsReader(folder), internvit.key_table(vita.vision_config(config), "")


def _audio_fallback(config, path):
    """As for the ViT: the audio encoder folder's ``final.pt`` when the shards lack the encoder."""
    pt = os.path.join(path, config.mm_audio_encoder, "final.pt")
    if not os.path.exists(pt):
        raise CheckpointError(f"the audio encoder tensors are missing from {path} and {pt} does not exist")
    return TorchReader(pt), whale.key_table(vita.audio_config(config), prefix="")


def official_tensors(config, params, source_dtypes: dict):
    """Yields ``(official key, numpy tensor)`` one at a time, in key-table order, in the dtype the
    source checkpoint stored (float32 otherwise)."""
    for name, (_, _, rules) in vita.parts(config).items():
        for key, arr in loader.official_tensors(rules, params[name]):
            want = source_dtypes.get(key)
            if want is not None and arr.dtype != want:
                arr = arr.astype(want)
            elif arr.dtype == np.float64:
                arr = arr.astype(np.float32)
            yield key, arr


def save(dst: str, config, params: dict, source_dtypes: Optional[dict] = None, src: Optional[str] = None,
         tokenizer_dir: Optional[str] = None, write_extra=None, max_shard_bytes: int = 5 * 1024 ** 3,
         overwrite: bool = False) -> dict:
    """Writes ``params`` in the official release layout (``src``: the release folder they came
    from, whose config fields, tokenizer and tower folders are kept); ``write_extra(tmp)`` adds
    files (``vita_tts_ckpt``) before the folder is committed. Returns the index."""
    source_dtypes = source_dtypes or {}
    tmp = target.prepare_target(dst, overwrite)
    try:
        shards, cur, cur_bytes, weight_map, total = [], {}, 0, {}, 0

        def flush():
            nonlocal cur, cur_bytes
            if cur:
                name = f"shard-{len(shards):05d}.tmp"
                save_file(cur, os.path.join(tmp, name), metadata={"format": "pt"})
                shards.append((name, list(cur)))
                cur, cur_bytes = {}, 0
        for key, arr in official_tensors(config, params, source_dtypes):
            if cur and cur_bytes + arr.nbytes > max_shard_bytes:
                flush()
            cur[key] = arr
            cur_bytes += arr.nbytes
            total += arr.nbytes
        flush()
        n = len(shards)
        for i, (name, keys) in enumerate(shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(tmp, name), os.path.join(tmp, final))
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(release.hf_config(config, src), f, indent=2)
        release.copy_tokenizer(tmp, src, tokenizer_dir)
        if write_extra is not None:
            write_extra(tmp)
        release.write_side_folders(config, params, src, tmp)
        target.commit(tmp, dst)
        return index
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
