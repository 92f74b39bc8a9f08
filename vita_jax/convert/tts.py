"""The official speech-output checkpoint ``vita_tts_ckpt/``, both directions: ``decoder/{model.json,
final.pt}`` (the NAR+AR decoder, ``{"model": state_dict}``) and ``codec/{model.json,final.pt}``
(TiCodec ``{"generator", "quantizer", "encoder"}``). ``.pt`` files are read with
``weights_only=True`` only.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vita_jax import paths
from vita_jax.convert import loader
from vita_jax.convert import ticodec_ckpt as codec_io
from vita_jax.convert.safetensors_io import CheckpointError
from vita_jax.convert.torch_io import TorchReader
from vita_jax.models import ticodec
from vita_jax.models import tts_decoder as dec


def read(path: str):
    """A ``vita_tts_ckpt`` folder -> ``(decoder_cfg, decoder_params, codec)`` with ``codec`` =
    ``(config, raw state dicts, folded params)`` or None when there is no ``codec/``."""
    if not os.path.isdir(os.path.join(path, "decoder")):
        raise FileNotFoundError(f"{path}: no decoder/ folder (expected a vita_tts_ckpt folder)")
    cfg, params = load_decoder(os.path.join(path, "decoder"))
    codec = load_codec(os.path.join(path, "codec")) if os.path.isdir(os.path.join(path, "codec")) else None
    return cfg, params, codec


def load_decoder(folder: str):
    """``(config, params)`` from ``decoder/model.json`` + ``decoder/final.pt``."""
    cfg = dec.TTSDecoderConfig.from_model_json(os.path.join(folder, "model.json"))
    module = dec.TTSDecoder(cfg)
    x = jnp.zeros((1, 4, cfg.idim))
    abstract = nn.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, jnp.array([4]),
                                                           jnp.zeros((1, 2), jnp.int32), jnp.array([2]))["params"]))
    params, _ = loader.load(dec.key_table(cfg), TorchReader(os.path.join(folder, "final.pt")), abstract)
    return cfg, params


def load_codec(folder: str):
    """``(config, raw state dicts {generator, quantizer, encoder} as numpy, params)``: ``params`` holds the
    variables of the ``folded`` generator / encoder (weight norm folded here, once) and the codebooks."""
    cfg = ticodec.TiCodecConfig.from_model_json(os.path.join(folder, "model.json"))
    path = os.path.join(folder, "final.pt")
    raw = TorchReader.load_nested(path)
    missing = [p for p in ("generator", "quantizer") if p not in raw]
    if missing:
        raise CheckpointError(f"{path}: missing part(s) {missing} (expected generator, quantizer, encoder)")
    for part, sd in raw.items():  # every weight is a float (BatchNorm's step counter excepted)
        for k, v in sd.items():
            if not k.endswith("num_batches_tracked"):
                loader.check_kind(v.dtype, np.float32, f"tensor {part}.{k!r} in {path}")
    q = raw["quantizer"]
    params = {"codebook": jnp.asarray(q["quantizer_modules.0.embedding.weight"]),
              "globaltokens": [jnp.asarray(q[f"quantizer_modules_globaltokens.{j}.embedding.weight"])
                               for j in range(cfg.global_code_num)]}
    templates = ticodec.folded_templates(cfg)
    for part in ("generator", "encoder"):
        if part in raw:
            sd = ticodec.fold_state_dict(raw[part])
            params[part] = {c: codec_io.unflat(sd, t, f"{path} [{part}]") for c, t in templates[part].items()}
    return cfg, raw, params


def write(path: str, decoder_cfg, decoder_params, codec_cfg=None, codec_raw=None, src: Optional[str] = None) -> None:
    """Writes ``decoder/{model.json,final.pt}`` and ``codec/{model.json,final.pt}`` in the
    official formats (``{"model": sd}`` and ``{"generator", "quantizer", "encoder"}``)."""
    import torch  # optional dependency (the [torch] extra): .pt files are written with torch.save
    os.makedirs(os.path.join(path, "decoder"), exist_ok=True)
    sd = {k: torch.from_numpy(v) for k, v in loader.official_tensors(dec.key_table(decoder_cfg),
                                                                     decoder_params)}
    torch.save({"model": sd}, os.path.join(path, "decoder", "final.pt"))
    _write_or_copy_json(src, "decoder", path, decoder_cfg.to_model_json)
    if codec_raw is not None:
        os.makedirs(os.path.join(path, "codec"), exist_ok=True)
        torch.save({part: {k: torch.from_numpy(np.array(v, copy=True)) for k, v in d.items()}
                    for part, d in codec_raw.items()}, os.path.join(path, "codec", "final.pt"))
        _write_or_copy_json(src, "codec", path, codec_cfg.to_model_json)


def _write_or_copy_json(src_root, part, dst_root, make):
    """``part/model.json``: copied from the source checkpoint when it has one (unknown fields kept)."""
    src = paths.join(src_root or "", part, "model.json")  # the source may be a URL (vita_jax.paths)
    dst = os.path.join(dst_root, part, "model.json")
    if src_root and not paths.is_local(src_root) and paths.exists(src):
        paths.copy_file(src, dst)
    elif src_root and os.path.exists(src):
        shutil.copy2(src, dst)
    else:
        with open(dst, "w") as f:
            json.dump(make(), f, indent=4)
