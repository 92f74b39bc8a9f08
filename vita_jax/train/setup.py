"""Building the train state of a stage: parameters (loaded or random), partition, optimizer,
explicit shardings, and the jitted step."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from vita_jax import parallel
from vita_jax.models import vita
from vita_jax.train import stages
from vita_jax.train import step as step_lib


def state_shardings(state: step_lib.TrainState, param_shardings: dict, mesh):
    """Shardings for every leaf of the state: parameters by their logical names, optimizer moments
    like the parameter they belong to (found by its ``a/b/c`` key in the leaf path), scalars replicated."""
    rep = NamedSharding(mesh, P())

    def of(path, leaf):
        for k in reversed(path):
            key = getattr(k, "key", None)
            if isinstance(key, str) and key in param_shardings and np.shape(leaf) == param_shardings[key][1]:
                return param_shardings[key][0]
        return rep
    return jax.tree_util.tree_map_with_path(of, state)


def flat_param_shardings(boxed_tree, mesh) -> dict:
    """``{"a/b/c": (NamedSharding, shape)}`` from a boxed (logically partitioned) parameter tree."""
    sh = traverse_util.flatten_dict(nn.unbox(parallel.param_shardings(boxed_tree, mesh)), sep="/")
    shapes = traverse_util.flatten_dict(nn.unbox(boxed_tree), sep="/")
    return {k: (sh[k], tuple(shapes[k].shape)) for k in sh}


def build(config, params, mesh=None, total_steps: int | None = None):
    """``(state, jitted step, info)`` for ``params`` (a whole-model tree) under ``config``'s stage.
    Frozen leaves are cast to ``config.frozen_dtype``; with a mesh, the step has explicit in/out
    shardings and donates the state."""
    total = int(total_steps or config.total_steps)
    lab = stages.labels(params, config.trainable, config.optim.group_lrs)
    flat_lab = traverse_util.flatten_dict(lab, sep="/")
    train, frozen = stages.split(params, lab)
    if not train:
        raise ValueError(f"stage {config.stage}: no parameter matches the trainable patterns {list(config.trainable)}")
    fdt = jnp.dtype(config.frozen_dtype)
    # copies: the step donates its state, which must not take the caller's arrays with it
    frozen = {k: jnp.array(v, dtype=fdt if jnp.issubdtype(v.dtype, jnp.floating) else v.dtype, copy=True)
              for k, v in frozen.items()}
    train = {k: jnp.array(v, dtype=jnp.float32, copy=True) for k, v in train.items()}
    opt = stages.make_optimizer(config.optim, total, {k: flat_lab[k] for k in train})
    state = step_lib.init_state(train, frozen, opt)
    fn = step_lib.make_step(step_lib.make_loss(config), opt, stages.schedule_fn(config.optim, config.optim.lr, total),
                            accum=int(config.grad_accum), compute_dtype=jnp.dtype(config.dtype))
    info = dict(table=stages.count_table(params, lab), labels=lab)
    if mesh is None:
        # placement (``info["place"]``) may run ahead in the input pipeline's thread; the step takes either
        info["place"] = lambda batch: jax.tree.map(jnp.asarray, batch)
        return state, jax.jit(fn, donate_argnums=0), info
    pshard = {}
    for name, (module, example, _) in vita.parts(config).items():
        boxed = vita.abstract_part(module, example)
        pshard.update({f"{name}/{k}": v for k, v in flat_param_shardings(boxed, mesh).items()})
    shard = state_shardings(state, pshard, mesh)
    state = jax.device_put(state, shard)

    compiled = {}

    accum = int(config.grad_accum)
    n_proc = jax.process_count()

    def place_batch(batch):
        """This process's host batch -> global arrays placed over the data axes (``info["place"]``).

        ``batch`` is this process's slice of the global batch (all of it with one process); with
        ``grad_accum > 1`` its leaves carry a leading micro-batch axis, which is not sharded."""
        def place(x):
            x = np.asarray(x)
            gshape = list(x.shape)
            gshape[1 if accum > 1 else 0] *= n_proc
            names = ((None,) if accum > 1 else ()) + ("batch",) + (None,) * (x.ndim - (2 if accum > 1 else 1))
            sh = NamedSharding(mesh, parallel.logical_to_spec(names, gshape, mesh))
            if n_proc == 1:
                return jax.device_put(x, sh)
            if sh.spec[names.index("batch")] is None if len(sh.spec) > names.index("batch") else True:
                raise ValueError(f"{n_proc} processes feed slices of the batch, but the global batch dimension "
                                 f"{gshape[names.index('batch')]} is not sharded over the mesh's data/fsdp axes "
                                 f"{dict(mesh.shape)}: make batch_size divisible by data x fsdp")
            return jax.make_array_from_process_local_data(sh, x, tuple(gshape))
        return jax.tree.map(place, batch)

    def run(state, batch):
        """Runs the step on a host batch (placed here) or a placed one (jitted once per batch shape)."""
        placed = batch if all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch)) else place_batch(batch)
        bs = jax.tree.map(lambda x: x.sharding, placed)
        key = str(jax.tree.map(lambda x: (x.shape, str(x.dtype), str(x.sharding.spec)), placed))
        with parallel.use_mesh(mesh):
            if key not in compiled:
                compiled[key] = jax.jit(fn, in_shardings=(shard, bs), out_shardings=(shard, None), donate_argnums=0)
            return compiled[key](state, placed)
    info["shardings"] = shard
    info["place"] = place_batch
    return state, run, info

