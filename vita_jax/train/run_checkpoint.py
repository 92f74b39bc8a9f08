"""Orbax checkpoints of a training run: the train state, the data-iterator state and the config,
saved asynchronously every N steps, K kept. Orbax writes into a temporary folder and commits it
atomically, so a half-written checkpoint is never picked up; the temporary folders a killed run left
(``N.orbax-checkpoint-tmp-*``, orbax's own test of the name) are removed when the run restarts.
Restoring takes the *current* run's shardings as the target, so a checkpoint saved on one mesh
restores onto another; a checkpoint that cannot be restored (truncated, files missing) is moved
aside to ``N.unusable-<time>`` (outside orbax's step names, never deleted) once an older one
restores. The directory may be a URL (``gs://bucket/run/ckpt``): orbax gets it as an
``epath.Path`` (:func:`vita_jax.paths.for_orbax`)."""
from __future__ import annotations

import json
import time
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vita_jax import paths


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, every: int = 1000, async_save: bool = True,
                 clean: bool = False):
        """``clean``: remove orbax's unfinished saves (``.leftovers`` names them) -- only for the run that
        owns the folder (another reader could catch a live run's save in the middle)."""
        self.path = str(directory)
        self.directory = paths.for_orbax(directory)
        self.every = int(every)
        # what orbax's cleanup_tmp_directories (below) removes, listed first to say so
        self.leftovers = sorted(t.get().name for t in ocp.path.step.all_temporary_paths(self.directory)) \
            if clean and jax.process_index() == 0 else []
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                            enable_async_checkpointing=async_save, create=True,
                                            cleanup_tmp_directories=clean)
        self.mgr = ocp.CheckpointManager(self.directory, options=opts)
        wait = getattr(self.mgr, "_maybe_await_cleanup_tmp_directory", None)
        if clean and wait is not None:  # orbax removes them in a thread that close() does not join: an error
            wait()                      # right after opening would end the process under it (asyncio noise)

    def latest_step(self):
        return self.mgr.latest_step()

    def save(self, step: int, state, data_state=None, config=None, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state),
                "data": ocp.args.JsonSave(json.loads(json.dumps(data_state or {}, default=_jsonable)))}
        if config is not None:
            args["config"] = ocp.args.JsonSave(json.loads(config.to_json()))
        return self.mgr.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, target_state, uncommitted: bool = False):
        """``(state, data_state)``; ``target_state`` is a state (or abstract one) whose leaves carry the
        shardings to restore into. ``uncommitted`` (a run without a mesh): the state is read on the host and put
        on the default device uncommitted, as a freshly initialised state is; a committed one would lower the
        step and the evaluators with explicit shardings, other programs than the saving run's, compiled again
        instead of read from the persistent compilation cache."""
        if uncommitted:  # np.empty: the target's shapes and dtypes only (untouched pages cost nothing)
            abstract = jax.tree.map(lambda x: np.empty(x.shape, x.dtype), target_state)
        else:
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                   sharding=getattr(x, "sharding", None)),
                                    target_state)
        out = self.mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             data=ocp.args.JsonRestore()))
        state = jax.device_put(out["state"]) if uncommitted else out["state"]
        return state, out["data"]

    def restore_latest(self, target_state, log: Callable = print, uncommitted: bool = False):
        """``(step, state, data_state)`` of the newest checkpoint that restores. Each newer one that
        cannot is reported in one line and moved aside (``N.unusable-<time>``) so that the run can save
        step N again; when none restores, a ``ValueError`` naming the folder (nothing moved)."""
        failed = []
        for step in sorted(self.mgr.all_steps(), reverse=True):
            why = None
            try:
                state, data = self.restore(step, target_state, uncommitted)
            except Exception as e:  # tensorstore, orbax and JSON errors come in many types
                why = _reason(e)
            if jax.process_count() > 1:  # every process falls back together (each reads its own shards)
                bad = multihost_utils.process_allgather(np.int32(why is not None))
                why = why or ("unreadable on another process" if int(np.max(bad)) else None)
            if why is not None:
                failed.append((step, why))
                continue
            for bad, why in failed:
                moved = self.set_aside(bad)
                log(f"checkpoint {bad} in {self.path} cannot be restored ({why}); resuming from {step} "
                    f"(the unusable one is kept as {moved})")
            return step, state, data
        why = "; ".join(f"checkpoint {s}: {w}" for s, w in failed)
        raise ValueError(f"no checkpoint in {self.path} can be restored ({why}); nothing was changed: a run of "
                         "another config (then use another --workdir), or move the damaged checkpoints away")

    def saved_config(self, step: int):
        """The config dict saved with checkpoint ``step`` (None when it has none or it cannot be read)."""
        try:
            return dict(self.mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])
        except Exception:  # an older checkpoint without a config item, or a damaged one: restore_latest says so
            return None

    def check_same_run(self, step: int, config) -> None:
        """``ValueError`` (one line naming the folder and each differing field) when checkpoint ``step`` was
        saved by a run whose model or trained parts differ from ``config``'s (another stage or model size:
        its state cannot be this run's); run settings (steps, data, evals, mesh) may change between runs."""
        saved = self.saved_config(step)
        if saved is None:
            return
        changed = config_changes(saved, json.loads(config.to_json()))
        if changed:
            shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
            raise ValueError(f"{self.path} holds checkpoint {step} of another run ({shown}): use another --workdir "
                             "for this config, or the same config to resume it")

    def set_aside(self, step: int) -> str:
        """Renames checkpoint ``step`` to ``<step>.unusable-<time>`` (not a step name orbax reads); returns the name."""
        name = ocp.path.step.standard_name_format().build_name(step)
        moved = f"{name}.unusable-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            paths.rename(paths.join(self.path, name), paths.join(self.path, moved))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("vita_jax.checkpoint:set_aside")
        self.mgr.reload()
        return moved

    def wait(self):
        self.mgr.wait_until_finished()

    def close(self):
        self.mgr.wait_until_finished()
        self.mgr.close()


# the fields that shape the train state (parameters, trained / frozen split, optimizer groups): a checkpoint
# saved under other values cannot be resumed; everything else (total_steps, data, evals, ...) may change
SHAPING = ("stage", "loss", "trainable", "llm", "vision", "audio", "has_vision", "has_audio", "mm_projector_type",
           "mm_hidden_size", "ctc_units", "param_dtype", "frozen_dtype", "tts", "optim.group_lrs", "codec",
           "lora.rank", "lora.targets")
NO_LORA = ("lora.rank", "lora.targets")  # without adapters on either side (rank 0, or a config from before LoRA)
NOT_SHAPING = ("audio.dither",)  # preprocessing settings kept in the model blocks


def _leaves(tree, prefix: str) -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, f"{prefix}.{key}").items()}
    return {prefix: tree}


def config_changes(saved: dict, current: dict) -> list:
    """``["config.F: A -> B", ...]`` for each :data:`SHAPING` field that differs between two configs (as dicts)."""
    def get(tree, field):
        for k in field.split("."):
            tree = tree.get(k) if isinstance(tree, dict) else None
        return tree
    out = []
    off = not get(saved, "lora.rank") and not get(current, "lora.rank")
    for field in SHAPING:
        if off and field in NO_LORA:
            continue
        a, b = _leaves(get(saved, field), field), _leaves(get(current, field), field)
        for k in sorted(set(a) | set(b)):
            if k not in NOT_SHAPING and _norm(a.get(k)) != _norm(b.get(k)):
                out.append(f"config.{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def _norm(v):
    """JSON round trips turn tuples into lists."""
    return [_norm(x) for x in v] if isinstance(v, (list, tuple)) else v


def _reason(e: Exception, limit: int = 160) -> str:
    """The first line of an exception, short enough for a one-line message."""
    line = (str(e).strip().splitlines() or [""])[0]
    line = f"{type(e).__name__}: {line}" if line else type(e).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, bytes):
        return x.decode("latin1")
    raise TypeError(f"cannot store {type(x).__name__} in the data-iterator state")
