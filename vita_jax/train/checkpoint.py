"""Orbax checkpoints of a training run: the train state, the data-iterator state and the config,
saved asynchronously every N steps, K kept. Orbax writes into a temporary folder and commits it
atomically, so a half-written checkpoint is never picked up. Restoring takes the *current* run's
shardings as the target, so a checkpoint saved on one mesh restores onto another. The directory may
be a URL (``gs://bucket/run/ckpt``): orbax gets it as an ``epath.Path`` (:func:`vita_jax.paths.for_orbax`)."""
from __future__ import annotations

import json

import jax
import orbax.checkpoint as ocp

from vita_jax import paths


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, every: int = 1000, async_save: bool = True):
        self.directory = paths.for_orbax(directory)
        self.every = int(every)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                            enable_async_checkpointing=async_save, create=True)
        self.mgr = ocp.CheckpointManager(self.directory, options=opts)

    def latest_step(self):
        return self.mgr.latest_step()

    def save(self, step: int, state, data_state=None, config=None, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state),
                "data": ocp.args.JsonSave(json.loads(json.dumps(data_state or {}, default=_jsonable)))}
        if config is not None:
            args["config"] = ocp.args.JsonSave(json.loads(config.to_json()))
        return self.mgr.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, target_state):
        """``(state, data_state)``; ``target_state`` is a state (or abstract one) whose leaves carry the
        shardings to restore into."""
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                                target_state)
        out = self.mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def wait(self):
        self.mgr.wait_until_finished()

    def close(self):
        self.mgr.wait_until_finished()
        self.mgr.close()


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, bytes):
        return x.decode("latin1")
    raise TypeError(f"cannot store {type(x).__name__} in the data-iterator state")
