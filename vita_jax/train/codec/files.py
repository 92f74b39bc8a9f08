"""Stage 3.1 state <-> the official TiCodec training files, and the codec export.

* :func:`load_official`: ``model.json`` + ``g_XXXXXXXX`` / ``do_XXXXXXXX`` -> models, step state (with
  both Adam states when the files have them), ``(steps, epoch)`` as upstream resumes them.
* :func:`save_official`: the state -> ``g_`` / ``do_`` files the official ``train.py`` resumes from.
* :func:`export_codec`: ``vita_tts_ckpt/codec/{final.pt, model.json}`` (the inference layout that
  ``load_speech`` and stage 3.2 read; ``final.pt`` is a ``g_`` file).
* :func:`export_run`: a finished stage 3.1 run's ``WORKDIR/model``: both of the above, committed atomically.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

from vita_jax.convert import target
from vita_jax.convert import ticodec_ckpt as io
from vita_jax.models import ticodec as tt
from vita_jax.train.codec import step as cs


def lr_at(cfg: tt.CodecTrainConfig, epoch: int) -> float:
    """ExponentialLR stepped once per epoch: ``lr0 · lr_decay ** epoch`` (epoch 0-based)."""
    lr = float(cfg.learning_rate)
    for _ in range(max(0, epoch)):
        lr *= float(cfg.lr_decay)  # iterated in Python floats as the scheduler does
    return lr


def templates(M: cs.CodecModels):
    """Abstract ``(gp, gb, dp, db)`` of the config (shapes only)."""
    return jax.eval_shape(lambda: cs.init_variables(M, 0))


def _adam_state(t, params):
    if t is None:
        return None
    count, mu, nu = t
    return optax.ScaleByAdamState(count=np.asarray(count, np.int32), mu=mu, nu=nu)


def load_official(folder_or_json: str, g_path: str, do_path: Optional[str] = None):
    """``(models, state, info)``; ``info``: ``steps`` / ``epoch`` stored in the do_ file (-1 / -1 when
    none), the ``_metadata`` and Adam param groups (kept when written back)."""
    folder_or_json = os.fspath(folder_or_json)
    mj = folder_or_json if folder_or_json.endswith(".json") else os.path.join(folder_or_json, "model.json")
    cfg = tt.CodecTrainConfig.from_model_json(mj)
    M = cs.CodecModels.build(cfg)
    gp_t, gb_t, dp_t, db_t = templates(M)
    g = io.read(g_path, io.G_PARTS)
    gp, gb = io.split(g, {"params": gp_t, "buffers": gb_t}, g_path)
    gb = jax.tree.map(lambda x: x.astype(np.int32) if x.dtype == np.int64 else x, gb)
    info = dict(steps=-1, epoch=-1, g_metadata=g["_metadata"], d_metadata=None, groups={})
    if do_path is None:
        dp, db = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), (dp_t, db_t))
        return M, cs.new_state(gp, gb, dp, db), info
    d = io.read(do_path, io.D_PARTS)
    dp, db = io.split(d, {"params": dp_t, "buffers": db_t}, do_path)
    gopt = _adam_state(io.optimizer_from_torch(d["optim_g"], gp, io.G_PARTS, f"{do_path} [optim_g]"), gp)
    dopt = _adam_state(io.optimizer_from_torch(d["optim_d"], dp, io.D_OPT_ORDER, f"{do_path} [optim_d]"), dp)
    info.update(steps=int(d["steps"]), epoch=int(d["epoch"]), d_metadata=d["_metadata"],
                groups={k: d[k]["param_groups"][0] for k in ("optim_g", "optim_d")})
    return M, cs.new_state(gp, gb, dp, db, gopt, dopt, step=int(d["steps"]) + 1), info


def save_official(folder: str, M: cs.CodecModels, state, epoch: int, info: Optional[dict] = None) -> tuple:
    """Writes ``g_{steps:08d}`` / ``do_{steps:08d}`` with ``steps`` = index of the last completed
    update (upstream's convention); returns the two paths."""
    info = info or {}
    state = jax.device_get(state)
    steps = int(state["step"]) - 1
    os.makedirs(folder, exist_ok=True)
    gp, dp = state["gp"], state["dp"]
    lr = lr_at(M.cfg, epoch)
    betas = (M.cfg.adam_b1, M.cfg.adam_b2)
    opts = {}
    for key, opt, params, parts in (("optim_g", state["gopt"], gp, io.G_PARTS),
                                    ("optim_d", state["dopt"], dp, io.D_OPT_ORDER)):
        opts[key] = io.optimizer_to_torch(int(opt.count), opt.mu, opt.nu, params, parts, lr, float(M.cfg.learning_rate),
                                          betas, info.get("groups", {}).get(key))
    gpath, dpath = os.path.join(folder, f"g_{steps:08d}"), os.path.join(folder, f"do_{steps:08d}")
    io.write_g(gpath, gp, state["gb"], info.get("g_metadata"))
    io.write_do(dpath, dp, state["db"], opts["optim_g"], opts["optim_d"], steps, epoch, info.get("d_metadata"))
    return gpath, dpath


def export_codec(folder: str, M: cs.CodecModels, state, global_tokens=None) -> str:
    """``folder/{final.pt, model.json}`` in VITA's ``vita_tts_ckpt/codec`` layout."""
    state = jax.device_get(state)
    os.makedirs(folder, exist_ok=True)
    io.write_g(os.path.join(folder, "final.pt"), state["gp"], state["gb"])
    mj = M.cfg.to_model_json()
    if global_tokens is not None:
        mj["global_tokens"] = [int(t) for t in global_tokens]
    with open(os.path.join(folder, "model.json"), "w") as f:
        json.dump(mj, f, indent=4)
    return folder


CODEC_DIR = os.path.join("vita_tts_ckpt", "codec")  # inside a stage 3.1 run's model folder
OFFICIAL_DIR = "ticodec"  # upstream train.py's checkpoint folder (model.json, g_ / do_), to go on training there


def export_complete(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, d, f)) for d in (CODEC_DIR, OFFICIAL_DIR) for f in ("model.json",)) \
        and os.path.isfile(os.path.join(folder, CODEC_DIR, "final.pt"))


def export_run(folder: str, M: cs.CodecModels, state, epoch: int, heldout=None) -> str:
    """``folder/vita_tts_ckpt/codec/{final.pt, model.json}`` (global tokens: the first held-out clip's, else
    the config's) and ``folder/ticodec/{model.json, g_XXXXXXXX, do_XXXXXXXX}``, written into a temporary
    sibling and committed at once (a kill leaves the previous folder or none, never half of one)."""
    if jax.process_count() > 1:  # sharded leaves -> whole host copies on every process; process 0 writes
        state = multihost_utils.process_allgather(state, tiled=True)
    tokens = heldout.global_tokens(state) if heldout else None
    if jax.process_index() != 0:
        return folder
    tmp = target.prepare_target(folder, overwrite=True)
    export_codec(os.path.join(tmp, CODEC_DIR), M, state, tokens)
    save_official(os.path.join(tmp, OFFICIAL_DIR), M, state, epoch)
    with open(os.path.join(tmp, OFFICIAL_DIR, "model.json"), "w") as f:
        json.dump(M.cfg.to_model_json(), f, indent=4)
    target.commit(tmp, folder)
    return folder
