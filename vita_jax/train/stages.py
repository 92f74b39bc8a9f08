"""The VITA-1.5 training curriculum: one entry per paper stage (trainable parameters by path
pattern, loss, learning rates) and the trainable/frozen partition of a parameter tree.

Paths are ``/``-joined Flax paths of the whole-model tree (``llm/...``, ``vision_tower/...``,
``mm_projector/...``, ``audio_encoder/encoder/...``, ``audio_encoder/adpter/...``, ``ctc/...``,
``tts_decoder/...``). Official values are the defaults: AdamW (0.9, 0.999, 1e-8), weight decay 0,
cosine schedule with 3 % warmup, clip 1.0; LR 5e-4 for adapter-only stages, 2e-5 full, ViT 2e-6.
Frozen parameters are not differentiated (no backward pass below the lowest trainable module) and
get no optimizer state.
"""
from __future__ import annotations

import re
from typing import Iterable

import jax
import ml_collections
import optax
from flax import traverse_util

from vita_jax import config as config_lib
from vita_jax.train import codec_setup

# stage -> (description, trainable patterns, loss, lr, {pattern: lr}, frozen pattern overrides)
STAGES = {
    "1.1": ("vision alignment: projector only", (r"mm_projector/.*",), "lm", 5e-4, {}),
    "1.2": ("vision understanding: ViT + projector + LLM", (r"vision_tower/.*", r"mm_projector/.*", r"llm/.*"), "lm",
            2e-5, {r"vision_tower/.*": 2e-6}),
    "1.3": ("vision SFT: ViT + projector + LLM", (r"vision_tower/.*", r"mm_projector/.*", r"llm/.*"), "lm", 2e-5,
            {r"vision_tower/.*": 2e-6}),
    "2.1a": ("speech encoder with a CTC head", (r"audio_encoder/encoder/(?!cmvn_).*", r"ctc/.*"), "ctc", 5e-4, {}),
    "2.1b": ("speech adapter, LLM must output the transcript", (r"audio_encoder/adpter/.*",), "lm", 5e-4, {}),
    "2.2": ("audio SFT with negatives: projector + speech adapter + LLM (the released recipe)",
            (r"mm_projector/.*", r"audio_encoder/adpter/.*", r"llm/.*"), "lm", 1e-5, {}),
    "3.2": ("NAR + AR speech decoder, LLM frozen", (r"tts_decoder/.*",), "tts", 5e-4, {}),
}


def stage_config(stage: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one stage; ``arg == "tiny"`` selects the tiny model (tests, the demo). Stage 3.1
    (the speech codec) has its own: :func:`vita_jax.train.codec_setup.stage_config`."""
    if stage == "3.1":
        return codec_setup.stage_config(arg)
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; stages: {sorted(STAGES) + ['3.1']}")
    if arg not in (None, "", "tiny"):
        raise ValueError(f"stage {stage}: unknown config variant {arg!r} (none for the full size, or ':tiny')")
    desc, trainable, loss, lr, group_lrs = STAGES[stage]
    c = config_lib.load_config("tiny" if arg == "tiny" else "vita15")
    c.stage = stage
    c.description = desc
    c.trainable = list(trainable)
    c.loss = loss
    c.optim = ml_collections.ConfigDict(dict(lr=lr, group_lrs=[[g, v] for g, v in group_lrs.items()], b1=0.9,
                                             b2=0.999, eps=1e-8,
                                             weight_decay=0.0, grad_clip=1.0, warmup_ratio=0.03, schedule="cosine"))
    c.frozen_dtype = "bfloat16" if arg != "tiny" else "float32"  # frozen weights need no fp32 master copy
    c.total_steps = 20 if arg == "tiny" else 10000
    c.checkpoint_every = 10 if arg == "tiny" else 1000
    c.keep_checkpoints = 3
    c.batch_size = 4 if arg == "tiny" else 512
    c.grad_accum = 1 if arg == "tiny" else 2
    c.max_nonfinite_steps = 5
    c.max_empty_steps = 20  # steps in a row with no target tokens (every sample bad) stop the run
    c.ctc_units = 0  # 0: from the unit vocabulary trained on the transcripts
    c.init_from = ""  # previous stage's checkpoint (parameters only, fresh optimizer)
    # evaluators during training, {name: dict(type=..., data=..., every=N, ...)} (vita_jax/evals); on the command
    # line as JSON: --config.evals='{"dev": {"type": "asr", "data": "dev.jsonl", "every": 500}}'
    c.evals = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict(dict(mixture=[], tfds=[], shuffle_seed=0, seq_len=128 if arg == "tiny" else 6200,
                                            max_tiles_per_sample=1 if arg == "tiny" else tiles_per_image(c),
                                            max_clips_per_sample=1,
                                            max_frames=128 if arg == "tiny" else 3000, synthetic_size=256,
                                            packing=arg != "tiny",  # several examples per row (data/packing.py)
                                            # packed batches' media slots: "auto" (sized from the first
                                            # calibration_examples samples) or "fixed" (tile_budget tiles, 0: the
                                            # per-sample maximum x rows; audio_buckets [[frames, slots], ...], []: one
                                            # bucket of max_frames)
                                            budgets="fixed" if arg == "tiny" else "auto", calibration_examples=1024,
                                            tile_budget=0, audio_buckets=[],
                                            workers=4,  # host preprocessing threads (0: in the pipeline's thread)
                                            prefetch=2,  # steps' batches made and placed ahead (0: in series)
                                            # media paths of the mixture's JSON files must resolve inside
                                            # their media_root (or declared set folder): absolute paths and
                                            # '..' / symlink escapes are bad samples unless this (or an entry's
                                            # own "allow_outside_root": true) allows them
                                            allow_outside_media_root=False,
                                            tokenizer=""))  # tokenizer folder (default: init_from)
    if stage == "3.2":  # the speech decoder: input width = LLM width / 4 (the release: 896, 1024 codes)
        tiny = arg == "tiny"
        c.tts = ml_collections.ConfigDict(dict(idim=c.llm.hidden_size // 4, odim=64 if tiny else 1024,
                                               attention_heads=4 if tiny else 14, linear_units=64 if tiny else 4864,
                                               num_blocks=4))
    return c


def tiles_per_image(config) -> int:
    """The most tiles one image becomes under ``config.image`` (``max_dynamic_patch`` + the
    thumbnail): the default tile budget of a training sample (13 for VITA-1.5; the tiny configs
    keep 1, what their synthetic examples have: set it to this for official data)."""
    im = config.image
    return int(im.max_dynamic_patch) + (1 if im.use_thumbnail and im.max_dynamic_patch > 1 else 0)


def _path(p) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in p)


def labels(params, trainable: Iterable[str], group_lrs=()):
    """Per-leaf label: ``"frozen"``, ``"train"``, or ``"train:<pattern>"`` for a learning-rate group
    (``group_lrs``: ``[[pattern, lr], ...]``; the first matching group wins)."""
    pats = [re.compile(p) for p in trainable]
    groups = [(g, re.compile(g)) for g, _ in (group_lrs or ())]

    def one(path, _):
        s = _path(path)
        if not any(p.fullmatch(s) for p in pats):
            return "frozen"
        for g, rx in groups:
            if rx.fullmatch(s):
                return f"train:{g}"
        return "train"
    return jax.tree_util.tree_map_with_path(one, params)


def split(tree, lab):
    """``(trainable, frozen)`` as flat ``{"a/b/c": leaf}`` dicts (string keys: checkpoint friendly)."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    flat_l = traverse_util.flatten_dict(lab, sep="/")
    train = {k: v for k, v in flat.items() if flat_l[k] != "frozen"}
    frozen = {k: v for k, v in flat.items() if flat_l[k] == "frozen"}
    return train, frozen


def merge(train: dict, frozen: dict):
    return traverse_util.unflatten_dict({**frozen, **train}, sep="/")


def schedule_fn(optim, lr: float, total_steps: int):
    """Cosine decay to 0 after a linear warmup of ``warmup_ratio`` of the steps (or constant)."""
    if optim.schedule != "cosine":
        return optax.constant_schedule(lr)
    warm = max(1, int(optim.warmup_ratio * total_steps))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm, max(total_steps, warm + 1), 0.0)


def make_optimizer(optim, total_steps: int, train_labels: dict) -> optax.GradientTransformation:
    """Clip + AdamW over the *trainable* leaves only (so frozen ones have no state), one learning
    rate per group."""
    def adamw(lr):
        return optax.adamw(schedule_fn(optim, lr, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay)
    transforms = {"train": adamw(optim.lr)}
    transforms.update({f"train:{g}": adamw(lr) for g, lr in optim.group_lrs})
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip), optax.multi_transform(transforms, train_labels))


def count_table(params, lab) -> str:
    """Trainable / frozen parameter counts per top-level module (printed at start-up)."""
    rows = {}
    flat = traverse_util.flatten_dict(params)
    flat_l = traverse_util.flatten_dict(lab)
    for k, v in flat.items():
        mod = k[0] if k[0] != "audio_encoder" else f"audio_encoder/{k[1]}"
        t, f = rows.get(mod, (0, 0))
        rows[mod] = (t + v.size, f) if flat_l[k] != "frozen" else (t, f + v.size)
    w = max(len(m) for m in rows)
    lines = [f"{'module':<{w}}  {'trainable':>14}  {'frozen':>14}"]
    for m, (t, f) in rows.items():
        lines.append(f"{m:<{w}}  {t:>14,}  {f:>14,}")
    tt, ff = sum(t for t, _ in rows.values()), sum(f for _, f in rows.values())
    lines.append(f"{'total':<{w}}  {tt:>14,}  {ff:>14,}")
    return "\n".join(lines)
