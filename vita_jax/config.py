"""Configs: ``ml_collections`` ``get_config(arg)`` files, big_vision-style overrides
(``--config=configs/tiny.py[:arg] --config.llm.hidden_size=128``), and the translation of an
official ``config.json`` into the same ConfigDict."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Sequence

import ml_collections

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# Qwen2 fields read from an official config.json (same names in config.llm).
LLM_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings")


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every config file; model files fill ``llm``."""
    c = ml_collections.ConfigDict()
    c.llm = ml_collections.ConfigDict(dict(
        vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, head_dim=0, intermediate_size=18944, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=False))
    # vision: InternViT-300M-448px + x0.5 pixel shuffle + mlp2x_gelu projector
    c.has_vision = True
    c.vision = ml_collections.ConfigDict(dict(
        image_size=448, patch_size=14, num_channels=3, hidden_size=1024, num_hidden_layers=24,
        num_attention_heads=16, intermediate_size=4096, layer_norm_eps=1e-6, qkv_bias=True))
    c.mm_vision_tower = "OpenGVLab/InternViT-300M-448px"
    c.mm_projector_type = "mlp2x_gelu"
    c.mm_hidden_size = 4096
    c.image = ml_collections.ConfigDict(dict(
        size=448, crop_size=448, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resample=3,
        max_dynamic_patch=12, min_dynamic_patch=1, use_thumbnail=True,
        video_fps=1.0, video_max_frames=16, video_min_frames=4))
    # speech input: whale encoder + adapter (architecture from the audio-encoder folder's train.yaml)
    c.has_audio = True
    c.mm_audio_encoder = "VITA-MLLM/VITA-1.5_AudioEnc"
    c.audio = ml_collections.ConfigDict(dict(
        input_dim=80, attention_dim=1024, attention_heads=16, linear_units=4096, num_blocks=24,
        max_positions=5000, chunk_size=-1, left_chunks=-1, llm_embed_dim=3584, kernel_size=5,
        activation="gelu", dither=0.0))
    c.dtype = "float32"          # compute dtype
    c.param_dtype = "float32"    # storage dtype of parameters
    c.remat_policy = "none"      # none | full | dots | dots_no_batch | qkv_proj
    c.attention_impl = "auto"    # auto (XLA chooses) | xla | cudnn
    c.mesh_shape = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.bos_token_id = -1
    c.eos_token_id = -1
    c.tokenizer_model_max_length = 6200
    c.seq_bucket = 64            # spliced sequences are padded to a multiple of this (jit shapes)
    c.frame_bucket = 64          # fbank frames of an audio batch likewise
    c.seed = 0
    c.bench = ml_collections.ConfigDict(dict(batch=1, seq_len=128, steps=3, decode_tokens=32,
                                             decode_batch=1, prompt_len=16, peak_tflops=0.0, hbm_gbps=0.0))
    return c


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``path/to/file.py[:arg]`` (a bare name like ``tiny`` means ``configs/tiny.py``) ->
    ``module.get_config(arg)``."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py") and os.sep not in path:
        path = os.path.join(CONFIG_DIR, path + ".py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    mod_spec = importlib.util.spec_from_file_location(f"_vita_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {path} has no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def _parse_value(text: str, current):
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
        value = ml_collections.ConfigDict(value)
    return value


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Sets ``config.<dotted>`` from the command-line string ``text``, typed like the old value."""
    parts = dotted.split(".")
    node = config
    for i, p in enumerate(parts[:-1]):
        if p not in node:
            raise KeyError(f"--config.{dotted}: config has no field {'.'.join(parts[:i + 1])!r}")
        node = node[p]
    last = parts[-1]
    if last not in node:
        raise KeyError(f"--config.{dotted}: config has no field {dotted!r}")
    try:
        node[last] = _parse_value(text, node[last])
    except (ValueError, TypeError) as e:
        raise ValueError(f"--config.{dotted}={text}: {e}") from e


def parse_args(argv: Sequence[str], default: str | None = None):
    """Splits ``--config=...`` and ``--config.x=y`` off ``argv``. Returns ``(config, rest)``."""
    spec, overrides, rest = default, [], []
    it = iter(argv)
    for a in it:
        if a.startswith("--config=") or a == "--config":
            spec = a.split("=", 1)[1] if "=" in a else next(it)
        elif a.startswith("--config."):
            key, sep, val = a[len("--config."):].partition("=")
            if not sep:
                val = next(it)
            overrides.append((key, val))
        else:
            rest.append(a)
    if spec is None:
        raise ValueError("no --config=FILE given")
    config = load_config(spec)
    for key, val in overrides:
        apply_override(config, key, val)
    return config, rest


def from_release(directory: str) -> ml_collections.ConfigDict:
    """ConfigDict of an official release folder (``config.json``); unknown fields are ignored."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path} not found: not an official-layout release directory") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from e
    c = base_config()
    for k in LLM_FIELDS:
        if k not in hf:
            raise KeyError(f"{path}: field {k!r} is missing")
        c.llm[k] = type(c.llm[k])(hf[k])
    if hf.get("head_dim"):
        c.llm.head_dim = int(hf["head_dim"])
    for k in ("bos_token_id", "eos_token_id", "tokenizer_model_max_length"):
        if isinstance(hf.get(k), int):
            c[k] = hf[k]
    _vision_from_release(c, hf, directory, path)
    _audio_from_release(c, hf, directory, path)
    return c


def _audio_from_release(c, hf: dict, directory: str, path: str) -> None:
    """Fills ``c.audio`` from the ``train.yaml`` of the folder that ``mm_audio_encoder`` names (relative
    to the release directory); the built-in VITA-1.5 dimensions when it is the hub id without a folder."""
    import logging
    from vita_jax.models import whale
    enc = hf.get("mm_audio_encoder")
    if not enc:
        c.has_audio = False
        return
    c.mm_audio_encoder = enc
    folder = enc if os.path.isabs(enc) else os.path.join(directory, enc)
    yaml_path = os.path.join(folder, "train.yaml")
    if os.path.exists(yaml_path):
        y = whale.read_train_yaml(yaml_path)
        if y.pop("dynamic_chunks"):
            logging.getLogger(__name__).warning(
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
    from vita_jax.data.image import ImageProcessorConfig
    from vita_jax.models import internvit
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
        for k, v in internvit.read_hf_config(folder).items():
            c.vision[k] = type(c.vision[k])(v)
        pp = os.path.join(folder, "preprocessor_config.json")
        proc = ImageProcessorConfig.from_file(pp) if os.path.exists(pp) else ImageProcessorConfig(
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


# ----------------------------------------------------------------------------- module configs
def llm_config(config: ml_collections.ConfigDict):
    from vita_jax.models import qwen2
    impl = None if config.attention_impl == "auto" else config.attention_impl
    return qwen2.Qwen2Config.from_config(config.llm, dtype=config.dtype, param_dtype=config.param_dtype,
                                         remat_policy=config.remat_policy, attention_impl=impl)


def vision_config(config: ml_collections.ConfigDict):
    from vita_jax.models import internvit
    if not config.has_vision:
        return None
    return internvit.InternViTConfig.from_config(config.vision, dtype=config.dtype, param_dtype=config.param_dtype,
                                                 remat_policy=config.remat_policy)


def audio_config(config: ml_collections.ConfigDict):
    from vita_jax.models import whale
    if not config.has_audio:
        return None
    # the adapter always projects to the LLM width (a train.yaml that disagrees is rejected on load)
    return whale.WhaleConfig.from_config(config.audio, dtype=config.dtype, param_dtype=config.param_dtype,
                                         remat_policy=config.remat_policy, llm_embed_dim=config.llm.hidden_size)
