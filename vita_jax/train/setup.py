"""Building the train state of a stage: parameters (loaded or random), partition, optimizer,
explicit shardings, and the jitted step. The same code builds an abstract state (shapes, dtypes
and shardings, nothing allocated) for ahead-of-time compilation (:mod:`vita_jax.train.compile`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vita_jax import parallel
from vita_jax.data import shards as shards_lib
from vita_jax.models import lora, vita
from vita_jax.train import stages
from vita_jax.train import step as step_lib


@dataclasses.dataclass
class StageProgram:
    """A stage as the training loop runs it.

    ``state``: the initial train state (a pytree, placed); ``step(state, placed batch) -> (state, metrics)``
    (jitted; metrics a dict of device scalars with ``loss``, ``tokens``, ``finite``, ``nonfinite``);
    ``place(host batch)``: the batch on the devices (may run in the input pipeline's thread); ``data``: an
    iterator of host micro-batches with ``get_state`` / ``set_state``; ``table``: the parameter table
    logged at the start; ``params_of(state)``: the whole-model parameters (evaluators, export);
    ``export(state, folder)``: writes ``WORKDIR/model``; ``complete(folder)``: whether that export is
    finished; ``evals``: the stage's own evaluator or None (the trainer's ``config.evals``);
    ``step_size(host batch)``: ``(rows, length, tiles, frames)`` of the global step for the FLOPs
    count, or None; ``shardings``: the state's shardings (None without a mesh); ``to_checkpoint(state)``: what
    a run checkpoint holds of the state (all of it, or with LoRA the adapters' part and the frozen base's
    fingerprint), ``from_checkpoint(saved, state)``: the state back from it (``state``: the program's own)."""
    state: Any
    step: Callable
    place: Callable
    data: Any
    table: str
    params_of: Callable
    export: Callable[[Any, str], None]
    complete: Callable[[str], bool]
    evals: Any = None
    step_size: Callable[[dict], Optional[tuple]] = lambda host: None
    shardings: Any = None
    to_checkpoint: Callable = lambda state: state
    from_checkpoint: Callable = lambda saved, state: saved


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


def model_param_shardings(config, mesh) -> dict:
    """``{"part/a/b": (NamedSharding, shape)}`` for every model part (and its LoRA adapters), from its
    logical names."""
    out, parts = {}, vita.parts(config)
    boxed = {name: vita.abstract_part(module, example) for name, (module, example, _) in parts.items()}
    spec = lora.spec_of(config)
    if spec is not None:
        boxed = _deep_update(boxed, lora.abstract_adapters(spec, lora.init_parts(config),
                                                           lora.target_modules(spec, boxed)))
    for name, tree in boxed.items():
        out.update({f"{name}/{k}": v for k, v in flat_param_shardings(tree, mesh).items()})
    return out


def _deep_update(tree: dict, extra: dict) -> dict:
    flat = traverse_util.flatten_dict(tree, sep="/")
    flat.update(traverse_util.flatten_dict(extra, sep="/"))
    return traverse_util.unflatten_dict(flat, sep="/")


def with_adapters(config, params: dict) -> tuple[dict, list]:
    """``(params, adapted module paths)``: ``params`` plus new LoRA adapters when ``config.lora`` asks for them
    and ``params`` has none yet (abstract ones for an abstract tree); unchanged without LoRA."""
    spec = lora.spec_of(config)
    if spec is None:
        return params, []
    modules = lora.target_modules(spec, params)
    parts = lora.init_parts(config)
    abstract = all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(params))
    if not lora.adapters_of(params):
        if abstract:
            extra = nn.unbox(lora.abstract_adapters(spec, parts, modules))
        else:
            extra = lora.init_adapters(spec, parts, modules, seed=int(config.seed))
        params = _deep_update(params, extra)
    if spec.base_dtype:  # QLoRA: the adapted kernels stored quantized (abstract: their shapes)
        quantize = lambda p: lora.quantize_base(spec, parts, modules, p)  # noqa: E731
        params = jax.eval_shape(quantize, params) if abstract else quantize(params)
    return params, modules


def abstract_params(config) -> dict:
    """The whole-model parameter tree of ``config``'s stage as ``jax.ShapeDtypeStruct`` leaves (the
    parts and the stage's heads), nothing allocated."""
    if config.loss == "ctc" and int(config.ctc_units) < 1:
        raise ValueError("config.ctc_units = 0 (sized from the data): give it, e.g. --config.ctc_units=5000")
    params = {name: nn.unbox(vita.abstract_part(p.module, p.example)) for name, p in vita.parts(config).items()}
    heads = jax.eval_shape(lambda: vita.init_heads(config, {}, seed=int(config.seed)))
    return with_adapters(config, {**params, **heads})[0]


def make_state_and_step(config, params, total_steps: int | None = None):
    """``(state, step fn, labels)`` for ``params`` (a whole-model tree) under ``config``'s stage:
    trainable leaves in fp32, frozen ones in ``config.frozen_dtype``, the optimizer over the
    trainable ones. With ``jax.ShapeDtypeStruct`` leaves the state is abstract too."""
    total = int(total_steps or config.total_steps)
    params, modules = with_adapters(config, params)
    # with LoRA the adapters are the trainable partition: the base is frozen (no optimizer state, no gradient)
    trainable = [".*(" + "|".join(lora.SUFFIXES) + ")"] if modules else config.trainable
    lab = stages.labels(params, trainable, config.optim.group_lrs if not modules else ())
    flat_lab = traverse_util.flatten_dict(lab, sep="/")
    train, frozen = stages.split(params, lab)
    if not train:
        raise ValueError(f"stage {config.stage}: no parameter matches the trainable patterns {list(config.trainable)}")
    fdt = jnp.dtype(config.frozen_dtype)
    fdt_of = lambda v: fdt if jnp.issubdtype(v.dtype, jnp.floating) else v.dtype  # noqa: E731
    opt = stages.make_optimizer(config.optim, total, {k: flat_lab[k] for k in train})
    if all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves([train, frozen])):
        # (a QLoRA kernel keeps its int values and float32 scales)
        frozen = {k: v if lora.is_quantized(v) else jax.ShapeDtypeStruct(v.shape, fdt_of(v)) for k, v in frozen.items()}
        train = {k: jax.ShapeDtypeStruct(v.shape, jnp.float32) for k, v in train.items()}
        state = jax.eval_shape(lambda t, f: step_lib.init_state(t, f, opt), train, frozen)
    else:
        # copies: the step donates its state, which must not take the caller's arrays with it
        frozen = {k: jax.tree.map(lambda x: jnp.array(x, copy=True), v) if lora.is_quantized(v)
                  else jnp.array(v, dtype=fdt_of(v), copy=True) for k, v in frozen.items()}
        train = {k: jnp.array(v, dtype=jnp.float32, copy=True) for k, v in train.items()}
        state = step_lib.init_state(train, frozen, opt)
    lr_fn = stages.schedule_fn(config.optim, config.optim.lr, total)
    fn = step_lib.make_step(step_lib.make_loss(config, modules), opt, lr_fn,
                            accum=int(config.grad_accum), compute_dtype=jnp.dtype(config.dtype),
                            dropout_seed=int(config.seed) if modules and lora.spec_of(config).dropout > 0 else None)
    return state, fn, lab


def abstract_state(config, mesh, total_steps: int | None = None):
    """``(abstract state with shardings, step fn, state shardings)`` of ``config``'s stage on
    ``mesh``: what :func:`build` makes, as ``jax.ShapeDtypeStruct`` leaves (no weights)."""
    state, fn, _ = make_state_and_step(config, abstract_params(config), total_steps)
    shard = state_shardings(state, model_param_shardings(config, mesh), mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shard)
    return state, fn, shard


LOCAL_MEDIA = "local_media"  # the key a placed batch carries when its media are laid out per batch shard


def media_check(config, mesh) -> Callable[[dict], bool]:
    """``host batch -> bool``: whether an LM batch keeps every row's tiles and clips in its own batch shard of
    ``mesh`` (:func:`vita_jax.data.shards.media_local`; the data pipeline lays batches out so). Several processes
    must agree without talking: there a sharded LM batch laid out otherwise is refused."""
    n_proc, pid = jax.process_count(), jax.process_index()
    shards = parallel.data_parallel_size(mesh) // n_proc
    vc = vita.vision_config(config)
    tpt = vc.tokens_per_tile if vc is not None else 1

    def check(batch) -> bool:
        if shards * n_proc <= 1 or config.loss != "lm" or "src" not in batch:
            return False
        ok = shards_lib.media_local(batch, shards, tpt, (pid, n_proc))
        if not ok and n_proc > 1:
            raise ValueError(f"an LM batch's rows reference tiles or clips outside their own batch shard ({shards} "
                             f"per process): with several processes, lay batches out per shard as "
                             f"vita_jax.data.pipeline does (data.batch.media_local)")
        return ok
    return check


def batch_sharding(mesh, gshape, accum: int) -> NamedSharding:
    """A global batch leaf's sharding: rows (tiles, clips) over the data axes; with ``accum > 1``
    the leading micro-batch axis is not sharded."""
    names = ((None,) if accum > 1 else ()) + ("batch",) + (None,) * (len(gshape) - (2 if accum > 1 else 1))
    return NamedSharding(mesh, parallel.logical_to_spec(names, gshape, mesh))


def jit_step(fn, state_sharding, batch_sharding_tree):
    """The step under jit with explicit shardings; the state is donated."""
    return jax.jit(fn, in_shardings=(state_sharding, batch_sharding_tree), out_shardings=(state_sharding, None),
                   donate_argnums=0)


def build(config, params, mesh=None, total_steps: int | None = None):
    """``(state, jitted step, info)`` for ``params`` (a whole-model tree) under ``config``'s stage.
    Frozen leaves are cast to ``config.frozen_dtype``; with a mesh, the step has explicit in/out
    shardings and donates the state."""
    state, fn, lab = make_state_and_step(config, params, total_steps)
    info = dict(table=stages.count_table(stages.merge(state.train, state.frozen), lab), labels=lab)
    if mesh is None:
        # placement (``info["place"]``) may run ahead in the input pipeline's thread; the step takes either
        info["place"] = lambda batch: jax.tree.map(jnp.asarray, batch)
        return state, jax.jit(fn, donate_argnums=0), info
    shard = state_shardings(state, model_param_shardings(config, mesh), mesh)
    state = jax.device_put(state, shard)

    compiled = {}

    accum = int(config.grad_accum)
    n_proc = jax.process_count()
    local_media = media_check(config, mesh)

    def place_batch(batch):
        """This process's host batch -> global arrays placed over the data axes (``info["place"]``).

        ``batch`` is this process's slice of the global batch (all of it with one process); with
        ``grad_accum > 1`` its leaves carry a leading micro-batch axis, which is not sharded."""
        def place(x):
            x = np.asarray(x)
            gshape = list(x.shape)
            b = 1 if accum > 1 else 0
            gshape[b] *= n_proc
            sh = batch_sharding(mesh, gshape, accum)
            if n_proc == 1:
                return jax.device_put(x, sh)
            if sh.spec[b] is None if len(sh.spec) > b else True:
                raise ValueError(f"{n_proc} processes feed slices of the batch, but the global batch dimension "
                                 f"{gshape[b]} is not sharded over the mesh's data/fsdp axes "
                                 f"{dict(mesh.shape)}: make batch_size divisible by data x fsdp")
            return jax.make_array_from_process_local_data(sh, x, tuple(gshape))
        placed = jax.tree.map(place, batch)
        if local_media(batch):
            placed[LOCAL_MEDIA] = None  # a key, no array: the step's structure says so (see run)
        return placed

    def with_media(local: bool):
        def step(state, batch):  # its own function per layout: jax caches a trace by function, not by our flag
            with parallel.use_local_media(local):
                return fn(state, batch)
        return step
    fns = {True: with_media(True), False: with_media(False)}

    def run(state, batch):
        """Runs the step on a host batch (placed here) or a placed one (jitted once per batch shape and media
        layout: a batch whose rows keep their media on their own chips splices there, models/splice.py)."""
        placed = batch if all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch)) else place_batch(batch)
        local = LOCAL_MEDIA in placed
        placed = {k: v for k, v in placed.items() if k != LOCAL_MEDIA}
        bs = jax.tree.map(lambda x: x.sharding, placed)
        key = str(jax.tree.map(lambda x: (x.shape, str(x.dtype), str(x.sharding.spec)), placed)) + str(local)
        with parallel.use_mesh(mesh):
            if key not in compiled:
                compiled[key] = jit_step(fns[local], shard, bs)
            return compiled[key](state, placed)
    info["shardings"] = shard
    info["place"] = place_batch
    return state, run, info
