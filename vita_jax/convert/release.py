"""The official release directory's metadata, read and written in one place: ``config.json``, the
InternViT folder (``config.json``, ``preprocessor_config.json``, weights), the whale folder
(``train.yaml``, ``global_cmvn``, ``final.pt``), and tokenizer files (where the folders are
written: :mod:`vita_jax.convert.target`).

Layout (``VITA-MLLM/VITA-1.5``): ``config.json``, ``model.safetensors.index.json`` + shards (read
and written by :mod:`vita_jax.convert.pytorch`), tokenizer files, the folder ``mm_vision_tower``
names (or the hub id of the built-in tower), the folder ``mm_audio_encoder`` names, optional
``vita_tts_ckpt/`` (:mod:`vita_jax.convert.tts`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Optional

import numpy as np
import yaml

from vita_jax import config as config_lib
from vita_jax import paths
from vita_jax.convert import loader, target
from vita_jax.convert.safetensors_io import save_file
from vita_jax.convert.target import TOKENIZER_FILES
from vita_jax.data.image import IMAGENET_MEAN, IMAGENET_STD, ImageProcessorConfig
from vita_jax.models import internvit, vita, whale

log = logging.getLogger(__name__)
check_target = target.check_target  # the name the API calls it by

# Qwen2 fields read from an official config.json (same names in config.llm).
LLM_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings")



# ----------------------------------------------------------------------------- config.json
def read_config(directory: str):
    """ConfigDict of an official release folder (``config.json``); unknown fields are ignored."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path} not found: not an official-layout release directory") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object (the model config), got {type(hf).__name__}")
    c = config_lib.base_config()
    for k in LLM_FIELDS + (("head_dim",) if hf.get("head_dim") else ()):
        if k not in hf:
            raise KeyError(f"{path}: field {k!r} is missing")
        try:
            c.llm[k] = type(c.llm[k])(hf[k]) if k != "head_dim" else int(hf[k])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: field {k!r} = {hf[k]!r} is not a {type(c.llm[k]).__name__}") from e
    for k in ("bos_token_id", "eos_token_id", "tokenizer_model_max_length"):
        if isinstance(hf.get(k), int):
            c[k] = hf[k]
    _vision_from_release(c, hf, directory, path)
    _audio_from_release(c, hf, directory, path)
    return c


def _audio_from_release(c, hf: dict, directory: str, path: str) -> None:
    """Fills ``c.audio`` from the ``train.yaml`` of the folder that ``mm_audio_encoder`` names (relative
    to the release directory); the built-in VITA-1.5 dimensions when it is the hub id without a folder."""
    enc = hf.get("mm_audio_encoder")
    if not enc:
        c.has_audio = False
        return
    c.mm_audio_encoder = enc
    folder = enc if os.path.isabs(enc) else os.path.join(directory, enc)
    yaml_path = os.path.join(folder, "train.yaml")
    if os.path.exists(yaml_path):
        y = read_train_yaml(yaml_path)
        if y.pop("dynamic_chunks"):
            log.warning(
                "%s: transformer-dynamic-chunks is true: the official code then draws a random chunk mask on "
                "every call; vita_jax uses the static setting (chunk_size %s) instead", yaml_path, y["chunk_size"])
        y.pop("cmvn_file")
        for k, v in y.items():
            c.audio[k] = type(c.audio[k])(v)
    elif enc == whale.HUB_ID:
        c.audio.llm_embed_dim = c.llm.hidden_size
    else:
        raise FileNotFoundError(f"{path}: mm_audio_encoder {enc!r}: no folder {folder} with a train.yaml")
    if c.audio.llm_embed_dim != c.llm.hidden_size:
        raise ValueError(f"{yaml_path}: llm_embed_dim {c.audio.llm_embed_dim} != LLM hidden_size {c.llm.hidden_size}")


def _vision_from_release(c, hf: dict, directory: str, path: str) -> None:
    """Fills ``c.vision`` / ``c.image`` from the folder that ``mm_vision_tower`` names (relative to
    the release directory), or the built-in InternViT-300M-448px when it is that hub id."""
    tower = hf.get("mm_vision_tower")
    if not tower:
        c.has_vision = False
        return
    if "internvit" not in tower.lower():
        raise ValueError(f"{path}: mm_vision_tower {tower!r} is not an InternViT tower (the only one VITA-1.5 uses)")
    if hf.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"{path}: mm_projector_type {hf['mm_projector_type']!r} is not supported (mlp2x_gelu)")
    c.mm_vision_tower = tower
    folder = tower if os.path.isabs(tower) else os.path.join(directory, tower)
    if os.path.isdir(folder):
        for k, v in read_vision_config(folder).items():
            c.vision[k] = type(c.vision[k])(v)
        pp = os.path.join(folder, "preprocessor_config.json")
        proc = read_preprocessor_config(pp) if os.path.exists(pp) else ImageProcessorConfig(
            size=c.vision.image_size, crop_size=c.vision.image_size)
    elif tower == internvit.HUB_ID:
        proc = ImageProcessorConfig()
    else:
        raise FileNotFoundError(f"{path}: mm_vision_tower {tower!r}: no folder {folder}")
    c.image.update(size=proc.size, crop_size=proc.crop_size, mean=tuple(proc.mean), std=tuple(proc.std),
                   resample=proc.resample)
    c.mm_hidden_size = int(hf.get("mm_hidden_size", 4 * c.vision.hidden_size))
    if c.mm_hidden_size != 4 * c.vision.hidden_size:
        raise ValueError(f"{path}: mm_hidden_size {c.mm_hidden_size} != 4 x vision hidden {c.vision.hidden_size}")


def hf_config(config, src_dir: Optional[str]) -> dict:
    """The official config.json: the source's fields (unknown ones kept) updated from ``config``."""
    hf = {}
    if src_dir and os.path.exists(os.path.join(src_dir, "config.json")):
        with open(os.path.join(src_dir, "config.json")) as f:
            hf = json.load(f)
    hf.setdefault("architectures", ["VITAQwen2ForCausalLM"])
    hf.setdefault("model_type", "vita-Qwen2")
    hf.setdefault("hidden_act", "silu")
    for k in LLM_FIELDS:
        hf[k] = config.llm[k]
    if config.has_vision:
        hf.update(mm_vision_tower=config.mm_vision_tower, mm_hidden_size=config.mm_hidden_size,
                  mm_projector_type=config.mm_projector_type)
    if config.has_audio:
        hf["mm_audio_encoder"] = config.mm_audio_encoder
    for k in ("bos_token_id", "eos_token_id"):
        if config[k] >= 0:
            hf[k] = config[k]
    hf["tokenizer_model_max_length"] = config.tokenizer_model_max_length
    return hf


# ------------------------------------------------------------------------------ the ViT folder
def read_vision_config(folder: str) -> dict:
    """Fields of an InternViT ``config.json`` (the ``mm_vision_tower`` folder), checked against
    what this implementation supports."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        hf = json.load(f)
    hf = hf.get("vision_config", hf)
    if hf.get("norm_type", "layer_norm") != "layer_norm":
        raise ValueError(f"{path}: norm_type {hf['norm_type']!r} is not supported (InternViT-300M uses layer_norm)")
    if hf.get("qk_normalization", False):
        raise ValueError(f"{path}: qk_normalization=true is not supported (InternViT-300M has none)")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported")
    fields = [f.name for f in dataclasses.fields(internvit.InternViTConfig) if f.name not in ("dtype", "param_dtype",
                                                                                   "remat_policy")]
    missing = [k for k in fields if k not in hf and k not in ("num_channels", "qkv_bias")]
    if missing:
        raise KeyError(f"{path}: missing field(s) {missing}")
    return {k: hf[k] for k in fields if k in hf}


def read_preprocessor_config(path: str) -> ImageProcessorConfig:
    """The CLIP processor settings of an InternViT folder's ``preprocessor_config.json``."""
    with open(path) as f:
        c = json.load(f)

    def edge(v):
        return int(v["shortest_edge"] if isinstance(v, dict) and "shortest_edge" in v else
                   v["height"] if isinstance(v, dict) else v)
    try:
        return ImageProcessorConfig(size=edge(c["size"]), crop_size=edge(c.get("crop_size", c["size"])),
                                    mean=tuple(c.get("image_mean", IMAGENET_MEAN)),
                                    std=tuple(c.get("image_std", IMAGENET_STD)),
                                    resample=int(c.get("resample", 3)))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot read image processor settings: {e}") from e


def write_vision_folder(config, params, folder: str) -> None:
    """``config.json``, ``preprocessor_config.json`` and ``model.safetensors`` of the InternViT folder."""
    c, im = config.vision, config.image
    os.makedirs(folder, exist_ok=True)
    hf = dict(c.to_dict(), architectures=["InternVisionModel"], model_type="intern_vit_6b", norm_type="layer_norm",
              qk_normalization=False, hidden_act="gelu", dropout=0.0, attention_dropout=0.0, drop_path_rate=0.0,
              initializer_factor=1.0, initializer_range=0.02, use_flash_attn=False)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"crop_size": im.crop_size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                   "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(im.mean),
                   "image_std": list(im.std), "resample": im.resample, "size": im.size}, f, indent=2)
    tensors = dict(loader.official_tensors(internvit.key_table(vita.vision_config(config), ""), params["vision_tower"]))
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


# --------------------------------------------------------------------------- the whale folder
def read_train_yaml(path: str) -> dict:
    """The architecture fields of an official whale ``train.yaml`` (hyphenated keys as the
    official argparse-based reader maps them), checked against what is implemented."""
    try:
        with open(path) as f:
            y = yaml.safe_load(f)
        enc = y["encoder_conf"]
        tr = {k.replace("-", "_"): v for k, v in enc["para_conf"]["transformer"].items()}
        sub = {k.replace("-", "_"): v for k, v in enc["para_conf"].get("subsampling", {}).items()}
        model = y.get("model_conf", {})
        layers = enc["overview_conf"].get("encoder-layer-config", "subsampling-transformer")
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a whale train.yaml: {e}") from e

    def need(cond, msg):
        if not cond:
            raise ValueError(f"{path}: {msg}")

    need(layers == "subsampling-transformer", f"encoder-layer-config {layers!r} is not supported")
    need(sub.get("subsampling_rate", 4) == 4, f"subsampling-rate {sub.get('subsampling_rate')} is not supported (4)")
    need(tr.get("transformer_pos_enc_class", "rel-enc") == "rel-enc",
         "only transformer-pos-enc-class rel-enc is supported")
    need(tr.get("transformer_input_layer", "linear") == "linear", "only transformer-input-layer linear is supported")
    need(tr.get("transformer_normalize_before", True), "only transformer-normalize-before true is supported")
    need(not tr.get("transformer_concat_after", False), "transformer-concat-after true is not supported")
    need(model.get("adpter_type", "subsampling") == "subsampling",
         f"adpter_type {model.get('adpter_type')!r} is not supported")
    need(model.get("norm", "layer") == "layer", f"adapter norm {model.get('norm')!r} is not supported (layer)")
    need(not model.get("add_audio_bos_eos", False), "add_audio_bos_eos true is not supported")
    act = model.get("activation_func", "gelu")
    need(act in ("gelu", "relu"), f"adapter activation_func {act!r} is not supported")
    dim = int(tr.get("transformer_attention_dim", tr.get("transformer_output_dim", 1024)))
    need(int(sub.get("subsampling_output_dim", dim)) == dim,
         "subsampling-output-dim must equal transformer-attention-dim")
    out = dict(input_dim=int(y.get("input_dim", sub.get("subsampling_input_dim", 80))), attention_dim=dim,
               attention_heads=int(tr.get("transformer_attention_heads", 16)),
               linear_units=int(tr.get("transformer_linear_units", 4096)),
               num_blocks=int(tr.get("transformer_num_blocks", 24)),
               chunk_size=int(tr.get("transformer_chunk_size", -1)),
               left_chunks=int(tr.get("transformer_left_chunks", -1)),
               llm_embed_dim=int(model.get("llm_embed_dim", 3584)), kernel_size=int(model.get("kernel_size", 5)),
               activation=act,
               dynamic_chunks=bool(tr.get("transformer_dynamic_chunks", True)),
               dither=float(y.get("dataset_conf", {}).get("fbank_conf", {}).get("dither", 0.0)),
               cmvn_file=y.get("cmvn_file", "global_cmvn"))
    need(out["chunk_size"] != 0, "transformer-chunk_size 0 crashes the official code; use -1 (full) or > 0")
    return out


def read_cmvn(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Official ``global_cmvn`` JSON (``mean_stat``, ``var_stat``, ``frame_num``) -> float32
    ``(mean, istd)`` with the variance floored at 1e-20."""
    try:
        with open(path) as f:
            stats = json.load(f)
        mean_stat = np.asarray(stats["mean_stat"], np.float64)
        var_stat = np.asarray(stats["var_stat"], np.float64)
        count = float(stats["frame_num"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a global_cmvn statistics file: {e}") from e
    mean = mean_stat / count
    var = np.maximum(var_stat / count - mean * mean, 1e-20)
    return mean.astype(np.float32), (1.0 / np.sqrt(var)).astype(np.float32)


def write_audio_folder(config, params, folder: str) -> None:
    """``train.yaml``, ``global_cmvn`` and (with torch installed) ``final.pt``."""
    a = config.audio
    os.makedirs(folder, exist_ok=True)
    tr = {"transformer-input-dim": a.attention_dim, "transformer-output-dim": a.attention_dim,
          "transformer-attention-dim": a.attention_dim, "transformer-attention-heads": a.attention_heads,
          "transformer-linear-units": a.linear_units, "transformer-num-blocks": a.num_blocks,
          "transformer-input-layer": "linear", "transformer-pos-enc-class": "rel-enc",
          "transformer-normalize-before": True, "transformer-concat-after": False,
          "transformer-dynamic-chunks": False, "transformer-chunk_size": a.chunk_size,
          "transformer-left_chunks": a.left_chunks}
    y = {"input_dim": a.input_dim, "is_json_cmvn": True, "cmvn_file": "global_cmvn",
         "encoder_conf": {"overview_conf": {"encoder-input-dim": a.input_dim, "encoder-output-dim": a.attention_dim,
                                            "encoder-layer-config": "subsampling-transformer"},
                          "para_conf": {"subsampling": {"subsampling-rate": 4, "subsampling-input-dim": a.input_dim,
                                                        "subsampling-output-dim": a.attention_dim},
                                        "transformer": tr}},
         "model_conf": {"enc_out_dim": a.attention_dim, "llm_embed_dim": config.llm.hidden_size,
                        "kernel_size": a.kernel_size, "adpter_type": "subsampling",
                        "activation_func": a.activation, "norm": "layer",
                        "add_audio_bos_eos": False},
         "dataset_conf": {"resample_conf": {"resample_rate": 16000},
                          "fbank_conf": {"num_mel_bins": a.input_dim, "frame_length": 25, "frame_shift": 10,
                                         "dither": a.dither}}}
    with open(os.path.join(folder, "train.yaml"), "w") as f:
        yaml.safe_dump(y, f, sort_keys=False)
    enc = params["audio_encoder"]["encoder"]
    mean = np.asarray(enc["cmvn_mean"], np.float64)
    istd = np.asarray(enc["cmvn_istd"], np.float64)
    with open(os.path.join(folder, "global_cmvn"), "w") as f:  # frame_num 1: mean_stat = mean, var_stat = E[x^2]
        json.dump({"mean_stat": mean.tolist(), "var_stat": (1.0 / istd ** 2 + mean ** 2).tolist(), "frame_num": 1}, f)
    try:
        import torch  # optional dependency (the [torch] extra)
    except ImportError:
        return
    sd = {k: torch.from_numpy(v.astype(np.float32))
          for k, v in loader.official_tensors(whale.key_table(vita.audio_config(config), prefix=""),
                                              params["audio_encoder"])}
    torch.save(sd, os.path.join(folder, "final.pt"))


# ------------------------------------------------------------------------------- side files
def write_side_folders(config, params, src: Optional[str], tmp: str) -> None:
    """The vision / audio-encoder folders. A folder the
    config names is copied from the source; when the source has none it is generated (configs from
    the model config, weights from the model, as the official constructor reads them); hub ids
    (the built-in towers) get no folder, as in the official release."""
    for has, attr, hub, write in ((config.has_vision, "mm_vision_tower", internvit.HUB_ID, write_vision_folder),
                                  (config.has_audio, "mm_audio_encoder", whale.HUB_ID, write_audio_folder)):
        rel = config[attr]
        if not has or os.path.isabs(rel) or rel == hub:
            continue
        if src and os.path.isdir(os.path.join(src, rel)):
            shutil.copytree(os.path.join(src, rel), os.path.join(tmp, rel))
        else:
            write(config, params, os.path.join(tmp, rel))


def copy_tokenizer(dst: str, *sources: Optional[str]) -> None:
    """The tokenizer files of the first of ``sources`` (folders, local or URLs) that has a
    ``tokenizer.json``, into the local folder ``dst``."""
    for src in sources:
        if src and paths.exists(paths.join(src, "tokenizer.json")):
            for f in TOKENIZER_FILES:
                if not paths.is_local(src) and paths.exists(paths.join(src, f)):
                    paths.copy_file(paths.join(src, f), os.path.join(dst, f))
                elif os.path.exists(os.path.join(src, f)):
                    shutil.copy2(os.path.join(src, f), dst)
            return
