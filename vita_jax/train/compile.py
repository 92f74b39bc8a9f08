"""Ahead-of-time compilation of a stage's train step for a TPU topology, from a CPU host (like
MaxText's ``train_compile``): ``vita-jax compile --config=stage2_2 --topology=v5p:4x4x2``.

The state is built abstractly (``jax.ShapeDtypeStruct`` leaves with their shardings: no weights,
no TPU) by the trainer's own code (:func:`vita_jax.train.setup.abstract_state`), the batch from the
stage's batch layout (the packer's / collator's arrays for one row, times the rows), the mesh from
the devices of ``jax.experimental.topologies``; libtpu compiles the sharded step and reports the
memory one chip needs. Needs libtpu (``pip install -e ".[tpu]"``); runs on any host.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time

import jax
import numpy as np

from vita_jax import parallel
from vita_jax.data import packing, pipeline
from vita_jax.train import setup, trainer

GIB = 1024 ** 3
# HBM per chip (GiB) by the device kind that the topology's devices report
HBM_GIB = {"TPU v4": 32.0, "TPU v5 lite": 16.0, "TPU v5e": 16.0, "TPU v5": 95.0, "TPU v5p": 95.0,
           "TPU v6 lite": 32.0, "TPU v6e": 32.0, "TPU7x": 192.0}


class DoesNotFit(ValueError):
    """The compiled step needs more memory per chip than the chip has."""


def topology_devices(name: str) -> list:
    """The devices of a TPU topology such as ``v5p:4x4x2`` (compiled for, never run on)."""
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError('AOT compilation for TPU needs libtpu: pip install -e ".[tpu]"')
    from jax.experimental import topologies  # only with libtpu present
    # no TPU is opened: several compiles (and other libtpu users) may share this host
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # libtpu's own message (an unknown chip or shape)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        host = re.search(r'chips_per_host_bounds "(\d+(?:x\d+)*)"', first)
        if host is None:
            raise ValueError(f"--topology {name}: {first}") from e
    return _sub_host_slice(name, host.group(1), topologies)


def _sub_host_slice(name: str, host_bounds: str, topologies) -> list:
    """A slice smaller than one host (``v5e:1x1``, ``v5e:2x1``): jax describes whole hosts only, so the host's
    topology is described and its chips within the requested shape are the slice. The programs compiled for them
    are the slice's own (a mesh over those chips alone: no collective reaches the others)."""
    if not re.fullmatch(r"[a-z0-9]+:\d+(x\d+)+", name):
        raise ValueError(f"--topology {name}: expected CHIP:SHAPE such as v5e:1x1 or v5p:2x2x1")
    chip, shape = name.split(":")
    want = [int(v) for v in shape.split("x")]
    host = [int(v) for v in host_bounds.split("x")][:len(want)]
    if len(host) < len(want) or any(w > h for w, h in zip(want, host)):
        raise ValueError(f"--topology {name}: not a whole number of hosts ({chip} hosts hold {host_bounds} chips)")
    try:
        host_name = f"{chip}:{'x'.join(map(str, host))}"
        devices = topologies.get_topology_desc(platform="tpu", topology_name=host_name).devices
    except Exception as e:  # libtpu's own message
        raise ValueError(f"--topology {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    per_chip = len(devices) // math.prod(host)  # v2 / v3: two cores a chip
    inside = [d for d in devices if all(c < w for c, w in zip(d.coords, want))]
    if len(inside) != math.prod(want) * per_chip:
        raise ValueError(f"--topology {name}: {len(inside)} of the host's devices lie within {shape}")
    return inside


def row_template(config) -> dict:
    """One row of the stage's host batch (a micro-batch of one example per process) as a tree of
    ``jax.ShapeDtypeStruct``, in the trainer's structure (packing: ``audio_feats`` / ``audio_lens``
    lists of clip groups); every leading dimension grows with the rows (rows, tile slots, clip slots)."""
    if config.loss == "lm":
        one = dict(local=1, index=0, count=1, accum=1)
        if config.data.get("packing", False):
            # a packed row as the per-sample budgets give it (max_tiles_per_sample tiles, max_clips_per_sample clips
            # of max_frames); data.budgets="auto" sizes tile / clip slots from the data instead (docs/scaling.md)
            d = config.data
            arrays = packing.pack([], [[]], pipeline.packing_budget(config, one, audio_groups=[[int(d.max_frames),
                                                                                                int(d.max_clips_per_sample)]]))
        else:
            arrays = pipeline.lm_collator(config, one)([{"id": "-", "bad": "template row"}])
        return jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype), arrays)
    n = int(config.data.seq_len)
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    if config.loss == "tts":  # data/stage_batches.py tts_batch: reply tokens and their codec ids (2 per token)
        shapes = dict(text_ids=((1, n), i32), text_lens=((1,), i32), codes=((1, 2 * n), i32), code_lens=((1,), i32))
    elif config.loss == "ctc":  # data/stage_batches.py ctc_batch: fbank frames and unit labels
        f = int(config.data.max_frames)
        shapes = dict(feats=((1, f, 80), f32), lengths=((1,), i32), labels=((1, n), i32), label_mask=((1, n), i32))
    else:
        raise ValueError(f"unknown loss {config.loss!r} (lm, ctc, tts)")
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


def abstract_batch(config, mesh, rows: int) -> dict:
    """The global batch of ``rows`` examples per micro-batch as sharded ``jax.ShapeDtypeStruct``s,
    ``grad_accum`` micro-batches stacked as the trainer stacks them
    (:func:`~vita_jax.data.pipeline.stack_micro_batches`), placed as the trainer places a host batch."""
    accum = int(config.grad_accum)
    micro = jax.tree.map(lambda x: jax.ShapeDtypeStruct((x.shape[0] * rows,) + tuple(x.shape[1:]), x.dtype),
                         row_template(config))
    batch = pipeline.stack_micro_batches([micro] * accum) if accum > 1 else micro
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=setup.batch_sharding(mesh, x.shape, accum)), batch)


def compile_step(config, topology: str, per_chip_batch: int | None = None, hbm_gib: float | None = None,
                 log=print) -> dict:
    """Lowers and compiles ``config``'s train step for ``topology``; the per-chip memory (GiB),
    compile time and whether it fits ``hbm_gib`` (default: the chip's HBM)."""
    config = config.copy_and_resolve_references()
    if per_chip_batch is not None and per_chip_batch < 1:  # checked before libtpu is loaded (it logs on a CPU host)
        raise ValueError(f"--per-chip-batch {per_chip_batch}: must be at least 1")
    if hbm_gib is not None and not 0 < hbm_gib < float("inf"):
        raise ValueError(f"--hbm-gib {hbm_gib}: must be a number > 0")
    if not re.fullmatch(r"[a-z0-9]+:\d+(x\d+)+", topology):
        raise ValueError(f"--topology {topology}: expected CHIP:SHAPE such as v5p:4x4x2, v5e:2x2 or v6e:4x4")
    trainer.check_config(config)  # the stage's settings, as `vita-jax train` checks them (before libtpu loads)
    devices = topology_devices(topology)
    kind = devices[0].device_kind
    cap = float(hbm_gib) if hbm_gib is not None else HBM_GIB.get(kind)
    if cap is None:
        raise ValueError(f"no HBM size known for device kind {kind!r}: give --hbm-gib")
    mesh = parallel.make_mesh(dict(config.mesh_shape), devices=devices)
    shards = parallel.data_parallel_size(mesh)
    accum = int(config.grad_accum)
    if per_chip_batch is not None:
        config.batch_size = int(per_chip_batch) * shards * accum
    rows = int(config.batch_size) // accum
    if int(config.batch_size) % accum or rows % shards:
        raise ValueError(f"batch_size {config.batch_size} / grad_accum {accum} = {rows} rows per micro-batch: "
                         f"not divisible by the {shards} data x fsdp devices of mesh {dict(mesh.shape)}")
    log(f"stage {config.stage}: {topology}, {len(devices)} x {kind}, mesh {dict(mesh.shape)}, "
        f"{rows // shards} rows x {config.data.seq_len} per chip per micro-batch, grad_accum {accum}, "
        f"remat {_remat(config)}")
    t0 = time.perf_counter()
    state, fn, shard = setup.abstract_state(config, mesh)
    batch = abstract_batch(config, mesh, rows)
    # the trainer's pipeline lays each batch shard's tiles and clips in its own slots, so its step splices on each
    # chip alone (models/splice.py): the program compiled here is that one
    with parallel.use_mesh(mesh), parallel.use_local_media(config.loss == "lm"):
        lowered = setup.jit_step(fn, shard, jax.tree.map(lambda x: x.sharding, batch)).lower(state, batch)
    t1 = time.perf_counter()
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves((state.train, state.frozen)))
    r = dict(topology=topology, chips=len(devices), device_kind=kind, mesh=dict(mesh.shape),
             stage=str(config.stage), params=int(n_params), per_chip_batch=rows // shards, global_batch=rows * accum,
             grad_accum=accum, seq_len=int(config.data.seq_len), remat=_remat(config),
             tiles_per_sample=int(config.data.max_tiles_per_sample) if config.loss == "lm" else 0,
             hbm_capacity_gib=cap, lower_s=round(t1 - t0, 2))
    try:
        compiled = lowered.compile()
    except Exception as e:  # libtpu refuses a program over the chip's HBM: a result, not a crash
        need = out_of_memory_gib(str(e))
        if need is None:
            raise
        r.update(hbm_per_chip_gib=need, fits=False, compiler_out_of_memory=True,
                 compile_s=round(time.perf_counter() - t1, 2))
        return r
    t2 = time.perf_counter()
    m = compiled.memory_analysis()
    args, outs, alias = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes
    temp, code = m.temp_size_in_bytes, m.generated_code_size_in_bytes
    total = args + outs - alias + temp + code
    r.update(arguments_gib=args / GIB, outputs_gib=outs / GIB, aliased_gib=alias / GIB, temporaries_gib=temp / GIB,
             generated_code_gib=code / GIB, hbm_per_chip_gib=total / GIB, fits=bool(total <= cap * GIB),
             compile_s=round(t2 - t1, 2))
    return r


def out_of_memory_gib(message: str) -> float | None:
    """The temporaries (GiB) of libtpu's "RESOURCE_EXHAUSTED: Ran out of memory on HBM, ... HLO
    temporaries (284.29G) exceeds available HBM (95.74G)" (-1 when it names no size; None for any
    other error)."""
    if "RESOURCE_EXHAUSTED" not in message:
        return None
    m = re.search(r"\(([\d.]+)([KMGT])\) exceeds available HBM", message)
    return float(m.group(1)) * {"K": 2.0 ** -20, "M": 2.0 ** -10, "G": 1.0, "T": 1024.0}[m.group(2)] if m else -1.0


def report(r: dict) -> str:
    """The human-readable lines of a :func:`compile_step` result and, last, its JSON line."""
    head = f"per chip ({r['device_kind']}, {r['hbm_capacity_gib']:.1f} GiB HBM):"
    if r.get("compiler_out_of_memory"):
        lines = [head, f"  the compiler ran out of HBM: temporaries alone need {r['hbm_per_chip_gib']:.2f} GiB "
                       f"of {r['hbm_capacity_gib']:.1f}: DOES NOT FIT"]
    else:
        lines = [head,
                 f"  arguments        {r['arguments_gib']:9.2f} GiB",
                 f"  outputs          {r['outputs_gib']:9.2f} GiB (aliased with arguments: {r['aliased_gib']:.2f} GiB)",
                 f"  temporaries      {r['temporaries_gib']:9.2f} GiB",
                 f"  generated code   {r['generated_code_gib']:9.2f} GiB",
                 f"  total            {r['hbm_per_chip_gib']:9.2f} GiB of {r['hbm_capacity_gib']:.1f} "
                 f"({100 * r['hbm_per_chip_gib'] / r['hbm_capacity_gib']:.0f} %): "
                 f"{'fits' if r['fits'] else 'DOES NOT FIT'}"]
    lines += [f"lowered in {r['lower_s']:.1f} s, compiled in {r['compile_s']:.1f} s", json.dumps(r, sort_keys=True)]
    return "\n".join(lines)


def not_fitting_message(r: dict) -> str:
    return (f"stage {r['stage']} does not fit {r['topology']}: {r['hbm_per_chip_gib']:.2f} GiB per chip"
            f"{' (temporaries alone, the compiler ran out of HBM)' if r.get('compiler_out_of_memory') else ''} > "
            f"{r['hbm_capacity_gib']:.1f} GiB HBM (per-chip batch {r['per_chip_batch']} x {r['seq_len']}, "
            f"remat {r['remat']})")


def _remat(config) -> str:
    """The remat policy, with the towers' own where they differ (``dots_no_batch, vision full``)."""
    out = str(config.remat_policy)
    for tower in ("vision", "audio"):
        own = config.get(f"{tower}_remat_policy") or ""
        if own and own != out:
            out += f", {tower} {own}"
    return out
