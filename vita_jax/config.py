"""Configs: ``ml_collections`` ``get_config(arg)`` files and big_vision-style overrides
(``--config=stage2_2:tiny --config.llm.hidden_size=128``, or a file: ``--config=my/recipe.py:arg``), and the
defaults every stage file of ``configs/`` shares. Plumbing only: the tower configs derived from a ConfigDict
live in :mod:`vita_jax.models.vita`, the reading of an official ``config.json`` in
:mod:`vita_jax.convert.release`.

The project's ``configs/`` folder is installed with the package as ``vita_jax.configs`` (setup.py's
``package_dir``); in a checkout (or an editable install) it is read beside the package."""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Sequence

import ml_collections

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# the configs of a name (``--config=stage2_2``): vita_jax/configs in an install, ../configs in a checkout; found
# from this file, not importlib.resources: an editable install of another checkout could answer for vita_jax.configs
CONFIG_DIR = next((d for d in (os.path.join(_PACKAGE, "configs"), os.path.join(os.path.dirname(_PACKAGE), "configs"))
                   if os.path.isfile(os.path.join(d, "__init__.py"))), os.path.join(_PACKAGE, "configs"))
STAGE_VARIANTS = ("tiny", "narrow")  # stage files' ARG besides none (the full size)


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
    # the towers' own policies ("": remat_policy's): InternViT's 1025-position tiles may want "full" where the LLM
    # keeps dots_no_batch
    c.vision_remat_policy = ""
    c.audio_remat_policy = ""
    # attention: auto (TPU: splash; GPU: cuDNN unpacked 16-bit, else tokamax) | xla | cudnn | splash | tokamax
    c.attention_impl = "auto"
    c.mesh_shape = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.bos_token_id = -1
    c.eos_token_id = -1
    c.tokenizer_model_max_length = 6200
    c.seq_bucket = 64            # spliced sequences are padded to a multiple of this (jit shapes)
    c.frame_bucket = 64          # fbank frames of an audio batch likewise
    c.loss_chunk = 512           # positions the LM loss makes logits for at once: [rows, 512, vocab] each
    c.seed = 0
    # training's extras (vita_jax/train): a profiler trace of steps "FIRST:LAST" (from 1) in WORKDIR/profile ("": none);
    # W&B, dict(project=..., name=..., mode=...) (empty: none; on the command line as JSON, like evals)
    c.profile_steps = ""
    c.wandb = ml_collections.ConfigDict()
    c.bench = ml_collections.ConfigDict(dict(batch=1, seq_len=128, steps=3, decode_tokens=32,
                                             decode_batch=1, prompt_len=16, peak_tflops=0.0, hbm_gbps=0.0,
                                             data_steps=20))
    return c


def stage_variant(stage: str, arg, variants: Sequence[str] = STAGE_VARIANTS) -> str:
    """A stage file's ARG checked: ``""`` (the full size) or one of ``variants``; else a one-line error."""
    if arg in (None, "") or arg in variants:
        return arg or ""
    raise ValueError(f"stage {stage}: unknown config variant {arg!r} (none for the full size, or "
                     f"{', '.join(':' + v for v in variants)})")


def stage_defaults(variant: str = "") -> ml_collections.ConfigDict:
    """The model of a stage's ``variant`` (``configs/vita15.py``; ``tiny.py``, ``narrow.py``) and the settings
    every LM stage shares: AdamW (0.9, 0.999, 1e-8, no weight decay) with a cosine schedule, 3 % warmup and
    clip 1.0; frozen weights stored in bf16; checkpoints kept, stop rules, the data pipeline's plumbing. A stage
    file states the rest: its trainables, loss, learning rates, data and batch shapes."""
    c = load_config({"": "vita15"}.get(variant, variant))
    c.optim = ml_collections.ConfigDict(dict(lr=0.0, group_lrs=[], b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                             grad_clip=1.0, warmup_ratio=0.03, schedule="cosine"))
    c.frozen_dtype = "bfloat16"  # frozen weights need no fp32 master copy
    c.keep_checkpoints = 3
    c.max_nonfinite_steps = 5
    c.max_empty_steps = 20  # steps in a row with no target tokens (every sample bad) stop the run
    c.ctc_units = 0  # 0: from the unit vocabulary trained on the transcripts
    c.init_from = ""  # previous stage's checkpoint (parameters only, fresh optimizer)
    # LoRA (vita_jax/models/lora.py): rank > 0 trains adapters on the kernels `targets` match (regular expressions
    # over parameter paths) and nothing else; the delta is scaled by alpha / rank; run checkpoints hold the adapters
    # and their optimizer state only; merge: the stage's export folds them into the weights (else adapters only);
    # base_dtype "int8" / "int4": the adapted kernels stored quantized (QLoRA)
    c.lora = ml_collections.ConfigDict(dict(
        rank=0, alpha=16.0, dropout=0.0, merge=True, base_dtype="",
        targets=[r"llm/model/layers/self_attn/(q|k|v|o)_proj/kernel",
                 r"llm/model/layers/mlp/(gate|up|down)_proj/kernel"]))
    # evaluators during training, {name: dict(type=..., data=..., every=N, ...)} (vita_jax/evals); on the command
    # line as JSON: --config.evals='{"dev": {"type": "asr", "data": "dev.jsonl", "every": 500}}'
    c.evals = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict(dict(
        mixture=[], tfds=[], shuffle_seed=0, max_clips_per_sample=1, synthetic_size=256,
        # packed batches' media slots (budgets="auto", a stage file's choice): sized from the first
        # calibration_examples samples; budgets="fixed": tile_budget tiles (0: the per-sample maximum x rows),
        # audio_buckets [[frames, slots], ...] ([]: one bucket of max_frames)
        calibration_examples=1024, tile_budget=0, audio_buckets=[],
        workers=4,  # host preprocessing threads (0: in the pipeline's thread)
        prefetch=2,  # steps' batches made and placed ahead (0: in series)
        # media paths of the mixture's JSON files must resolve inside their media_root (or declared set folder):
        # absolute paths and '..' / symlink escapes are bad samples unless this (or an entry's own
        # "allow_outside_root": true) allows them
        allow_outside_media_root=False,
        tokenizer=""))  # tokenizer folder (default: init_from)
    return c


def config_names() -> list[str]:
    """The names of the configs shipped with the package (``stage2_2`` for ``configs/stage2_2.py``), sorted."""
    files = os.listdir(CONFIG_DIR) if os.path.isdir(CONFIG_DIR) else []
    return sorted(f[:-3] for f in files if f.endswith(".py") and not f.startswith("_"))


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``NAME[:arg]`` (a config shipped with the package: ``stage2_2:tiny``) or ``path/to/file.py[:arg]``
    (from the working directory) -> ``module.get_config(arg)``."""
    path, _, arg = spec.partition(":")
    if not path.strip():
        raise ValueError(f"--config={spec}: no config file given (a name: stage1_1[:tiny], or a file: FILE.py[:ARG])")
    if not path.endswith(".py") and "/" not in path and os.sep not in path:
        names = config_names()
        if path not in names:
            raise ValueError(f"--config={spec}: no config named {path!r}; the names are {', '.join(names)} "
                             "(or give a file: FILE.py[:ARG])")
        path = os.path.join(CONFIG_DIR, path + ".py")
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    mod_spec = importlib.util.spec_from_file_location(f"_vita_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ValueError(f"config file {path}, line {e.lineno}: {e.msg}") from e
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} has no get_config()")
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
            spec = a.split("=", 1)[1] if "=" in a else next(it, None)
            if spec is None:
                raise ValueError("--config: needs a config (--config=stage1_1[:tiny] or --config=FILE.py[:ARG])")
        elif a.startswith("--config."):
            key, sep, val = a[len("--config."):].partition("=")
            if not sep:
                val = next(it, None)
                if val is None:
                    raise ValueError(f"{a}: needs a value (--config.{key}=VALUE)")
            overrides.append((key, val))
        else:
            rest.append(a)
    if spec is None:
        raise ValueError("no --config=FILE given")
    config = load_config(spec)
    for key, val in overrides:
        apply_override(config, key, val)
    return config, rest


# (block, fields that must be integers >= 1, [(numerator, denominator)] that must divide)
_MODEL_SIZES = (("llm", ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                         "intermediate_size"), (("num_attention_heads", "num_key_value_heads"),)),
                ("vision", ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                            "intermediate_size"),
                 (("hidden_size", "num_attention_heads"), ("image_size", "patch_size"))),
                ("audio", ("input_dim", "attention_dim", "attention_heads", "linear_units", "num_blocks",
                           "max_positions", "llm_embed_dim"), (("attention_dim", "attention_heads"),)))


def check_model(config) -> None:
    """``ValueError`` naming the field when the model's sizes cannot build a model (a size < 1, heads that do
    not divide the width, a patch grid pixel shuffle cannot halve), before anything is built."""
    for block, sizes, divides in _MODEL_SIZES:
        c = config.get(block)
        if c is None or (block != "llm" and not config.get(f"has_{block}", True)):
            continue
        for f in sizes:
            v = c.get(f)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"config.{block}.{f} = {v!r}: must be an integer >= 1")
        for a, b in divides:
            if c.get(a) is not None and c.get(b) is not None and c[a] % c[b]:
                raise ValueError(f"config.{block}.{a} = {c[a]} is not a multiple of config.{block}.{b} = {c[b]}")
    llm = config.get("llm")
    if llm is not None:
        head_dim = llm.get("head_dim") or llm.hidden_size // llm.num_attention_heads
        if (llm.get("head_dim") or 0) < 0 or head_dim % 2 or (not llm.get("head_dim") and
                                                               llm.hidden_size % llm.num_attention_heads):
            raise ValueError(f"config.llm.hidden_size = {llm.hidden_size} / num_attention_heads = "
                             f"{llm.num_attention_heads} (head_dim {llm.get('head_dim')}): each head needs an even "
                             "width (rotary embedding) that divides the hidden size")
    vis = config.get("vision")
    if vis is not None and config.get("has_vision", True):
        if (vis.image_size // vis.patch_size) % 2:
            raise ValueError(f"config.vision.image_size / patch_size = {vis.image_size // vis.patch_size} patches a "
                             "side: pixel shuffle needs an even number")
        if config.get("mm_hidden_size") is not None and config.mm_hidden_size != 4 * vis.hidden_size:
            raise ValueError(f"config.mm_hidden_size = {config.mm_hidden_size}: must be 4 x config.vision.hidden_size "
                             f"= {4 * vis.hidden_size} (pixel shuffle)")
