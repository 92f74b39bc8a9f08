"""Opening a model checkpoint of either kind: an official release folder or a vita_jax (orbax)
checkpoint, with its tokenizer and speech-output checkpoint. What the API, the trainer
(``init_from``) and the demo load through. A vita_jax checkpoint may also be read from a URL
(``gs://bucket/run/model``, through :mod:`vita_jax.paths`); a release folder must be local."""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax.numpy as jnp

from vita_jax import paths
from vita_jax.convert import lora_io, orbax_io, pytorch, tts
from vita_jax.data.text import TextTokenizer, load_tokenizer


class Checkpoint(NamedTuple):
    config: object              # ml_collections.ConfigDict
    params: dict                # {llm, vision_tower, mm_projector, audio_encoder}
    tokenizer: Optional[TextTokenizer]
    keys_read: list             # official keys read (empty for an orbax checkpoint)
    source_dtypes: dict         # official key -> stored dtype (kept for export)
    path: Optional[str]         # the release folder (None for an orbax checkpoint)
    tts: Optional[tuple]        # (decoder_cfg, decoder_params, codec or None) of vita_tts_ckpt/


def load(path: str, dtype=jnp.float32, mesh=None, config_overrides: Optional[dict] = None,
         strict: bool = True, adapters: Optional[str] = None) -> Checkpoint:
    """Reads ``path`` (release folder or vita_jax checkpoint); parameters in ``dtype``, placed in
    their shards with a ``mesh``. ``config_overrides`` (dotted fields -> values) apply to a release
    folder's config (an orbax checkpoint keeps the config it was saved with). ``adapters``: a LoRA
    adapter checkpoint (:mod:`vita_jax.convert.lora_io`) merged into the weights; ``path`` may itself be one,
    whose recorded base is then read."""
    if not paths.isdir(path):
        raise FileNotFoundError(f"{path} is not a directory")
    if adapters is None and lora_io.is_adapters(path):
        base = lora_io.base_of(path)
        if not base:
            raise FileNotFoundError(f"{path} holds LoRA adapters but names no base model: pass the base and "
                                    "adapters=PATH")
        return load(base, dtype, mesh, config_overrides, strict, adapters=path)
    ck = _load(path, dtype, mesh, config_overrides, strict)
    if adapters is not None:
        if not lora_io.is_adapters(adapters):
            raise FileNotFoundError(f"{adapters}: not a LoRA adapter checkpoint (no 'lora_adapters' in its "
                                    "vita_jax.json)")
        ck = ck._replace(params=lora_io.attach(adapters, ck.config, ck.params, mesh))
    return ck


def _load(path: str, dtype, mesh, config_overrides, strict) -> Checkpoint:
    if not paths.is_local(path) and not orbax_io.is_orbax_checkpoint(path):
        raise FileNotFoundError(f"{path}: no vita_jax checkpoint there (a release folder must be on a local disk)")
    speech = _speech(path)
    if orbax_io.is_orbax_checkpoint(path):
        config, params, dtypes = orbax_io.load(path, dtype, mesh)
        return Checkpoint(config, params, load_tokenizer(path), [], dtypes, None, speech)
    config, params, keys, dtypes = pytorch.load_release(path, dtype, mesh, config_overrides, strict)
    return Checkpoint(config, params, load_tokenizer(path), keys, dtypes, path, speech)


def _speech(path: str) -> Optional[tuple]:
    d = paths.join(path, "vita_tts_ckpt")
    if not paths.isdir(d):
        return None
    with paths.local_copy(d) as local:  # torch reads local files (a URL's folder is copied first)
        return tts.read(local)
