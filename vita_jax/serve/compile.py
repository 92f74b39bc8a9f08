"""Will it serve? The live server's LLM programs compiled ahead of time for a TPU topology from a CPU host:
``vita-jax compile --serve --config=vita15 --topology=v5e:2x2 --max-sessions 4 --max-len 4096 [--quantize int8]``.

The two programs the serve engine runs (:mod:`vita_jax.serve.engine`): the batch-1 prefill of a prompt of
``--max-prompt`` positions into a fresh cache row, and the decode step of all ``--max-sessions`` slots over a
KV cache of ``--max-len`` positions, on abstract weights (no checkpoint read) of the config's real shapes,
placed by the one rules table on the mesh (``--mesh``, default ``data=chips``: every chip a whole copy serving
its own sessions, i.e. one chip's memory; ``tensor=N`` shards the weights and the cache's KV heads). The
towers' and the speech decoder's weights (resident while serving, not in these programs) are added to the
per-chip total, replicated. Weight-only ``--quantize`` stores the LLM's linear kernels as qwix int values +
scales (:mod:`vita_jax.models.quantize`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vita_jax import parallel
from vita_jax.infer import generate as gen
from vita_jax.models import quantize as quantize_lib
from vita_jax.models import tts_decoder, vita
from vita_jax.models.qwen2 import KVCache
from vita_jax.sizes import round_up
from vita_jax.train import compile as train_compile

GIB = train_compile.GIB


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_llm(config, mesh, quantize: str | None):
    """``(module, params)``: the LLM (wrapped for ``quantize``) and its abstract sharded parameters."""
    part = vita.parts(config)["llm"]
    module = part.module
    init = jax.eval_shape(lambda: part.module.init(jax.random.PRNGKey(0), *part.example)["params"])
    shardings = nn.unbox(parallel.param_shardings(init, mesh))
    params = _abstract(nn.unbox(init), shardings)
    if quantize:
        modules = quantize_lib.modules_of({"llm": init}, quantize_lib.LLM_LINEAR)
        module = quantize_lib.wrap(part.module, modules, quantize, "llm/")
        qinit = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *part.example)["params"])
        # a quantized kernel's int values keep the kernel's sharding; its scales (one per output channel) are small
        flat_s = {k: v for k, v in jax.tree_util.tree_flatten_with_path(shardings)[0]}

        def place(path, x):
            s = flat_s.get(path)
            keep = s is not None and len(s.spec) <= x.ndim and all(
                d is None or x.shape[i] % math.prod(mesh.shape[a] for a in ((d,) if isinstance(d, str) else d)) == 0
                for i, d in enumerate(s.spec))
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s if keep else NamedSharding(mesh, P()))
        params = jax.tree_util.tree_map_with_path(place, nn.unbox(qinit))
    return module, params


def _other_weights_gib(config) -> float:
    """Towers, projector and speech decoder (bytes of their parameters in the config's dtype), GiB."""
    n = 0
    for name, part in vita.parts(config).items():
        if name != "llm":
            tree = jax.eval_shape(lambda p=part: p.module.init(jax.random.PRNGKey(0), *p.example)["params"])
            n += sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree)))
    tc = tts_decoder.TTSDecoderConfig()
    n += (tc.odim + 4) * tc.idim * 2 + tc.num_blocks * 3 // 2 * (4 * tc.idim ** 2 + 3 * tc.idim * tc.linear_units)
    return n * jnp.dtype(config.dtype).itemsize / GIB


def _cache(cfg, mesh, rows: int, length: int):
    kv_ok = "tensor" in mesh.shape and cfg.num_key_value_heads % mesh.shape["tensor"] == 0
    row_axes = tuple(a for a in ("data", "fsdp") if a in mesh.shape and mesh.shape[a] > 1)
    row_ok = rows % max(1, math.prod(mesh.shape[a] for a in row_axes)) == 0
    rows_spec = (row_axes or None) if row_ok else None
    kv = NamedSharding(mesh, P(None, rows_spec, None, "tensor" if kv_ok else None, None))
    cache = jax.eval_shape(lambda: dataclasses.replace(KVCache.init(cfg, rows, length),
                                                       index=jnp.zeros((rows,), jnp.int32)))
    vec = NamedSharding(mesh, P(rows_spec))
    sh = dataclasses.replace(cache, k=kv, v=kv, valid=NamedSharding(mesh, P(rows_spec, None)), index=vec,
                             next_pos=vec)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache, sh)


def _memory(lowered) -> dict:
    """A program's memory per chip (GiB); a compiler out of HBM gives the temporaries it named, ``oom``."""
    try:
        m = lowered.compile().memory_analysis()
    except Exception as e:  # libtpu refuses a program over the chip's HBM: a result, not a crash
        need = train_compile.out_of_memory_gib(str(e))
        if need is None:
            raise
        return dict(arguments_gib=0.0, temporaries_gib=need, extra_gib=need, total_gib=need, oom=True)
    extra = m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes + m.generated_code_size_in_bytes
    return dict(arguments_gib=m.argument_size_in_bytes / GIB, temporaries_gib=m.temp_size_in_bytes / GIB,
                extra_gib=extra / GIB, total_gib=(m.argument_size_in_bytes + extra) / GIB, oom=False)


def compile_serve(config, topology: str, max_sessions: int = 4, max_len: int = 4096, max_prompt: int | None = None,
                  quantize: str | None = None, mesh_shape: dict | None = None, hbm_gib: float | None = None,
                  log=print) -> dict:
    """Compiles the serve engine's prefill and decode programs for ``topology`` (see the module docstring);
    the per-chip memory of each and of serving (weights + cache + the larger program's temporaries)."""
    config = config.copy_and_resolve_references()
    config.param_dtype = config.dtype  # served weights are stored in the compute dtype (from_pretrained's dtype)
    for opt, v in (("--max-sessions", max_sessions), ("--max-len", max_len), ("--max-prompt", max_prompt)):
        if v is not None and v < 1:
            raise ValueError(f"{opt} {v}: must be at least 1")
    if quantize:
        quantize_lib.check(quantize)
    devices = train_compile.topology_devices(topology)
    kind = devices[0].device_kind
    cap = float(hbm_gib) if hbm_gib is not None else train_compile.HBM_GIB.get(kind)
    if cap is None:
        raise ValueError(f"no HBM size known for device kind {kind!r}: give --hbm-gib")
    mesh = parallel.make_mesh(dict(mesh_shape or {"data": len(devices)}), devices=devices)
    rows = max_sessions * parallel.data_parallel_size(mesh)  # max_sessions per data-parallel copy
    length = round_up(max_len, 64)
    prompt = round_up(int(max_prompt or min(length, 2048)), 64)  # the server's longest prompt program (its ladder top)
    log(f"serve: {topology}, {len(devices)} x {kind}, mesh {dict(mesh.shape)}, {max_sessions} sessions of "
        f"{length} positions per model copy, prompts up to {prompt}, {config.dtype}"
        f"{', LLM weights ' + quantize if quantize else ''}")
    t0 = time.perf_counter()
    module, params = abstract_llm(config, mesh, quantize)
    cfg = vita.llm_config(config)
    f32 = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
    static = dict(do_sample=False, top_k=0, vocab_limit=None, temperature=f32, top_p=f32)
    rep = NamedSharding(mesh, P())
    with parallel.use_mesh(mesh):
        decode = gen.decode_step.lower(module, params, jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=rep),
                                       _cache(cfg, mesh, rows, length), key, **static)
        row = jax.eval_shape(lambda: KVCache.init(cfg, 1, length))
        row = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), row)
        embeds = jax.ShapeDtypeStruct((1, prompt, cfg.hidden_size), jnp.dtype(config.dtype), sharding=rep)
        prefill = gen.prefill.lower(module, params, None, jax.ShapeDtypeStruct((1, prompt), jnp.int32, sharding=rep),
                                    row, key, inputs_embeds=embeds, **static)
    t1 = time.perf_counter()
    mem = {name: _memory(lowered) for name, lowered in (("decode", decode), ("prefill", prefill))}
    t2 = time.perf_counter()
    other = _other_weights_gib(config)
    # serving holds the weights and the slot cache (the decode program's arguments) at all times; a prefill
    # runs beside them with its one-row cache and prompt (inputs), its outputs and its temporaries
    inputs = _weights_gib((row, embeds))
    peak = max(mem["decode"]["total_gib"], mem["decode"]["arguments_gib"] + mem["prefill"]["extra_gib"] + inputs)
    oom = mem["decode"]["oom"] or mem["prefill"]["oom"]
    total = peak + other
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return dict(topology=topology, chips=len(devices), device_kind=kind, mesh=dict(mesh.shape), serve=True,
                max_sessions=max_sessions, max_len=length, max_prompt=prompt, dtype=str(config.dtype),
                quantize=quantize or "", llm_params=int(n_params), llm_weights_gib=_weights_gib(params),
                decode=mem["decode"], prefill=mem["prefill"], other_weights_gib=other, hbm_per_chip_gib=total,
                hbm_capacity_gib=cap, fits=bool(total <= cap and not oom), compiler_out_of_memory=oom,
                lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2))


def _weights_gib(params) -> float:
    """Bytes one chip holds of ``params`` (abstract, sharded), GiB."""
    n = 0
    for x in jax.tree.leaves(params):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        n += math.prod(shard) * x.dtype.itemsize
    return n / GIB


def report(r: dict) -> str:
    """The human-readable lines of a :func:`compile_serve` result and, last, its JSON line."""
    d, pf = r["decode"], r["prefill"]
    q = f" ({r['quantize']})" if r["quantize"] else ""
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    if r["compiler_out_of_memory"]:
        name = "decode" if d["oom"] else "prefill"
        return "\n".join([f"per chip ({r['device_kind']}, {r['hbm_capacity_gib']:.1f} GiB HBM), serving: the compiler "
                          f"ran out of HBM on the {name} program (temporaries alone {r[name]['temporaries_gib']:.2f} "
                          f"GiB): DOES NOT FIT", json.dumps(r, sort_keys=True)])
    lines = [f"per chip ({r['device_kind']}, {r['hbm_capacity_gib']:.1f} GiB HBM), serving:",
             f"  LLM weights      {r['llm_weights_gib']:9.2f} GiB{q}",
             f"  decode program   {d['total_gib']:9.2f} GiB (arguments {d['arguments_gib']:.2f}: weights + "
             f"{r['max_sessions']} x {r['max_len']} cache; temporaries {d['temporaries_gib']:.2f})",
             f"  prefill program  {pf['total_gib']:9.2f} GiB (temporaries {pf['temporaries_gib']:.2f} for "
             f"{r['max_prompt']} positions)",
             f"  towers + speech decoder weights {r['other_weights_gib']:.2f} GiB",
             f"  total            {r['hbm_per_chip_gib']:9.2f} GiB of {r['hbm_capacity_gib']:.1f} "
             f"({100 * r['hbm_per_chip_gib'] / r['hbm_capacity_gib']:.0f} %): {verdict}",
             f"lowered in {r['lower_s']:.1f} s, compiled in {r['compile_s']:.1f} s", json.dumps(r, sort_keys=True)]
    return "\n".join(lines)
