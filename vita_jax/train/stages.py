"""The VITA-1.5 training curriculum: the config of a paper stage by name (the recipes, trainable
parameters by path pattern, loss, learning rates, data, are the files configs/stage*.py) and the
trainable/frozen partition of a parameter tree.

Paths are ``/``-joined Flax paths of the whole-model tree (``llm/...``, ``vision_tower/...``,
``mm_projector/...``, ``audio_encoder/encoder/...``, ``audio_encoder/adpter/...``, ``ctc/...``,
``tts_decoder/...``). Official values are the defaults: AdamW (0.9, 0.999, 1e-8), weight decay 0,
cosine schedule with 3 % warmup, clip 1.0; LR 5e-4 for adapter-only stages, 2e-5 full, ViT 2e-6.
Frozen parameters are not differentiated (no backward pass below the lowest trainable module) and
get no optimizer state.
"""
from __future__ import annotations

import math
import re
from typing import Iterable

import jax
import ml_collections
import optax
from flax import traverse_util

from vita_jax import config as config_lib

# the stages of the curriculum, one config file each: configs/stage1_1.py ... configs/stage3_2.py
STAGES = ("1.1", "1.2", "1.3", "2.1a", "2.1b", "2.2", "3.1", "3.2")


def stage_config(stage: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one stage: ``configs/stage{stage}.py`` (dots as underscores, ``2.1a`` ->
    ``stage2_1a.py``) with ``arg``: none (the full size), ``"tiny"`` (tests, the demo) or ``"narrow"``."""
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; stages: {list(STAGES)}")
    return config_lib.load_config(f"stage{stage.replace('.', '_')}" + (f":{arg}" if arg else ""))


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
    # one label per parameter: a QLoRA kernel (qwix's quantized wrapper, a pytree itself) is one parameter
    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: not isinstance(x, dict))


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
        n = math.prod(v.shape)  # (a QLoRA kernel counts its values, not its scales)
        rows[mod] = (t + n, f) if flat_l[k] != "frozen" else (t, f + n)
    w = max(len(m) for m in rows)
    lines = [f"{'module':<{w}}  {'trainable':>14}  {'frozen':>14}"]
    for m, (t, f) in rows.items():
        lines.append(f"{m:<{w}}  {t:>14,}  {f:>14,}")
    tt, ff = sum(t for t, _ in rows.values()), sum(f for _, f in rows.values())
    lines.append(f"{'total':<{w}}  {tt:>14,}  {ff:>14,}")
    return "\n".join(lines)
