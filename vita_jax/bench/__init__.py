"""Benchmarks (not tests): ``python -m vita_jax.bench llm --config=qwen2p5_1p5b``.

Reports the jitted train step (forward + backward + AdamW update, bf16 compute by config) time,
tokens/s, model FLOPs per step counted as MaxText does (6 x matmul parameters x tokens, the
embedding gather not counted, plus causal attention 6 x 2 x B x S^2 x heads x head_dim / 2 per
layer, i.e. forward 4BS^2HD/2 times 3) and MFU against a per-device peak table; then batch-1
cached decoding tokens/s and its fraction of the HBM-bandwidth roofline (every decode step reads
all parameters plus the live KV cache once).
"""
from __future__ import annotations

import gc
import json
import resource
import shutil
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vita_jax import api, parallel
from vita_jax import config as config_lib
from vita_jax.bench import codec, evalgen, mixture, narrow
from vita_jax.convert.safetensors_io import SafetensorsReader
from vita_jax.data import audio as audio_lib
from vita_jax.data import pipeline, synthetic
from vita_jax.data.text import load_tokenizer
from vita_jax.infer import generate as gen
from vita_jax.models import qwen2, vita
from vita_jax.models.vita import AUDIO, IMAGE, PAD
from vita_jax.sizes import ceil_div
from vita_jax.train import stages, trainer
from vita_jax.train.flops import device_peaks, training_flops


def _timeit(fn, steps):
    out = fn()  # compile + warm-up
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / steps


def time_decode(module, params, cfg, prompt, ntok: int):
    """Greedy cached decoding of ``ntok`` steps after ``prompt [batch, length]`` (ids): ``(seconds per step, the
    KV cache)``; the prefill and one step run first, so compilation is not timed."""
    cache = qwen2.KVCache.init(cfg, prompt.shape[0], prompt.shape[1] + ntok + 2)
    kw = dict(do_sample=False, top_k=0, vocab_limit=None, temperature=jnp.float32(1), top_p=jnp.float32(1))
    key = jax.random.PRNGKey(0)
    tok, cache, _ = gen.prefill(module, params, prompt, jnp.ones_like(prompt), cache, key, **kw)
    tok, cache, _ = gen.decode_step(module, params, tok, cache, key, **kw)  # compile
    jax.block_until_ready(tok)
    t0 = time.perf_counter()
    for _ in range(ntok):
        tok, cache, _ = gen.decode_step(module, params, tok, cache, key, **kw)
    jax.block_until_ready(tok)
    return (time.perf_counter() - t0) / ntok, cache


def bench_llm(config) -> dict:
    cfg = vita.llm_config(config)
    b = config.bench
    mesh = parallel.make_mesh(dict(config.mesh_shape))
    module = qwen2.Qwen2ForCausalLM(cfg)
    params = vita.init_module(module, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    opt = optax.adamw(1e-5, weight_decay=0.0)
    opt_state = jax.jit(opt.init)(params)
    data_sh = parallel.data_sharding(mesh, 2, shape=(b.batch, b.seq_len))
    rng = np.random.default_rng(0)
    tokens = jax.device_put(rng.integers(0, cfg.vocab_size, (b.batch, b.seq_len + 1), dtype=np.int32)[:, :b.seq_len],
                            data_sh)

    def loss_fn(p, ids):
        logits, _ = module.apply({"params": p}, input_ids=ids)
        logits = logits[:, :-1].astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    def step(p, s, ids):
        loss, grads = jax.value_and_grad(loss_fn)(p, ids)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    p_sh = jax.tree.map(lambda x: x.sharding, params)
    s_sh = jax.tree.map(lambda x: x.sharding, opt_state)
    with parallel.use_mesh(mesh):
        train = jax.jit(step, in_shardings=(p_sh, s_sh, data_sh), out_shardings=(p_sh, s_sh, None),
                        donate_argnums=(0, 1))
        state = [params, opt_state]

        def run():
            state[0], state[1], loss = train(state[0], state[1], tokens)
            return loss
        step_time = _timeit(run, b.steps)
    params = state[0]
    flops = training_flops(cfg, b.batch, b.seq_len)
    kind = jax.devices()[0].device_kind
    peak, bw = device_peaks(kind, b.peak_tflops, b.hbm_gbps)
    n_dev = mesh.size
    res = dict(device=kind, n_devices=n_dev, config=dict(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
               params=n_params, dtype=jnp.dtype(cfg.dtype).name, remat=cfg.remat_policy),
               batch=b.batch, seq_len=b.seq_len, step_time_s=step_time,
               tokens_per_s=b.batch * b.seq_len / step_time, model_tflops_per_step=flops / 1e12,
               tflops_per_s_per_device=flops / step_time / n_dev / 1e12,
               mfu=(flops / step_time / n_dev / peak) if peak else None)

    # batch-1 (decode_batch) cached decoding
    db, plen, ntok = b.decode_batch, b.prompt_len, b.decode_tokens
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (db, plen)), jnp.int32)
    with parallel.use_mesh(mesh):
        dt, _ = time_decode(module, params, cfg, prompt, ntok)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    kv_bytes = 2 * cfg.num_hidden_layers * db * (plen + ntok // 2) * cfg.num_key_value_heads * cfg.dim_head \
        * jnp.dtype(cfg.dtype).itemsize
    roofline = (bw * n_dev) / (param_bytes + kv_bytes) if bw else None
    res.update(decode_batch=db, decode_tokens_per_s=db / dt, decode_step_ms=dt * 1e3,
               decode_roofline_steps_per_s=roofline, decode_roofline_fraction=(1 / dt) / roofline if roofline else None)
    return res


class _RSSPeak:
    """Samples the process's anonymous resident memory (``RssAnon`` in ``/proc/self/status``: heap and
    array buffers, not the page cache of memory-mapped shards) in a thread; ``peak`` in bytes."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, self.rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def __enter__(self):
        self.base = self.rss()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())


def bench_convert(config, shard_mb: int = 256) -> dict:
    """Host memory of export and import: a random model of ``config`` is written in the official
    layout and read back; reports the peak resident memory above the level before each step."""
    m = api.init_model(config)
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(m.params))
    largest_leaf = max(x.nbytes for x in jax.tree.leaves(m.params))
    d = tempfile.mkdtemp()
    try:
        with _RSSPeak() as w:
            t0 = time.perf_counter()
            m.save_pretrained(d + "/out", max_shard_bytes=shard_mb * 2 ** 20)
            t_save = time.perf_counter() - t0
        del m
        gc.collect()
        r = SafetensorsReader(d + "/out")
        shard_sizes = {}
        for k in r.keys():
            shard_sizes[r._where[k]] = shard_sizes.get(r._where[k], 0) + r.get(k).nbytes
        with _RSSPeak() as l:
            t0 = time.perf_counter()
            m2 = api.from_pretrained(d + "/out")
            jax.block_until_ready(m2.params)
            t_load = time.perf_counter() - t0
        return dict(params_bytes=n_bytes, largest_leaf_bytes=largest_leaf,
                    largest_shard_bytes=max(shard_sizes.values()), n_shards=len(shard_sizes),
                    export_s=t_save, export_peak_extra_bytes=w.peak - w.base,
                    import_s=t_load, import_peak_extra_bytes=l.peak - l.base)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def batch_usage(batch: dict, tokens_per_tile: int) -> dict:
    """Real vs allocated LLM positions, ViT tiles and whale frames of one host batch (packed or not,
    one clip array or packing's clip groups): a tile / clip is real when some spliced position
    reads from it."""
    kind, src = np.asarray(batch["kind"]), np.asarray(batch["src"])
    tiles = np.unique(src[kind == IMAGE] // max(tokens_per_tile, 1)) if (kind == IMAGE).any() else []
    read = set(src[kind == AUDIO].tolist())
    frames_real = frame_slots = base = 0
    feats, lens = batch["audio_feats"], batch["audio_lens"]
    for f, n in (zip(feats, lens) if isinstance(feats, (list, tuple)) else [(feats, lens)]):
        f, n = np.asarray(f), np.asarray(n)
        rows = int(audio_lib.llm_length(f.shape[1])) if f.size else 0  # adapter rows of one clip slot
        frames_real += sum(int(n[c]) for c in range(len(n)) if base + c * rows in read)
        frame_slots += int(np.prod(f.shape[:2]))
        base += len(n) * rows
    seg = np.asarray(batch["segment_ids"]) if "segment_ids" in batch else (kind != PAD).any(1)[:, None].astype(int)
    return dict(llm_real=int((kind != PAD).sum()), llm_slots=kind.size, tiles_real=len(tiles),
                tile_slots=int(np.shape(batch["pixels"])[0]), frames_real=frames_real, frame_slots=frame_slots,
                examples=int(sum(len(set(r[r > 0].tolist())) for r in seg)))


def bench_data(config) -> dict:
    """What the input pipeline achieves on ``config.data`` (official files): the fraction of LLM
    positions, tiles and frames that hold real data, host examples/s, over
    ``config.bench.data_steps`` micro-batches of one process, made as the trainer makes them
    (``grad_accum`` micro-batches stacked a step, ``data.prefetch`` steps ahead in a thread), and
    ``peak_rss_gib``: the process's peak resident memory (GiB, calibration included)."""
    tok_dir = config.data.tokenizer or config.init_from
    tok = load_tokenizer(tok_dir) if tok_dir else None
    if tok is None:
        raise ValueError("bench data needs a tokenizer: --config.data.tokenizer=DIR (a folder with tokenizer.json)")
    it = pipeline.official_data(config, tok)
    vc = vita.vision_config(config)
    accum = int(config.grad_accum)
    tot: dict = {}
    t0 = time.perf_counter()
    feed = pipeline.Prefetch(lambda: trainer.next_batch(it, accum), depth=int(config.data.get("prefetch", 2)))
    try:
        for _ in range(ceil_div(int(config.bench.get("data_steps", 20)), accum)):
            step, _ = feed.next()
            for i in range(accum):
                mb = step if accum == 1 else jax.tree.map(lambda x: x[i], step)  # noqa: B023 (used at once)
                for k, v in batch_usage(mb, vc.tokens_per_tile).items():
                    tot[k] = tot.get(k, 0) + v
            del step, mb
    finally:
        feed.close()
    dt = time.perf_counter() - t0
    frac = lambda a, b: tot[a] / tot[b] if tot[b] else None  # noqa: E731
    b = getattr(it, "budget", None)
    shape = {} if b is None else dict(tile_slots=b.tile_slots, audio_groups=[[g.frames, g.slots] for g in b.groups]
                                      if b.groups else [[b.frame_slots, b.clip_slots]])
    return dict(**shape, packing=bool(config.data.get("packing", False)),
                llm_real_fraction=frac("llm_real", "llm_slots"),
                tile_real_fraction=frac("tiles_real", "tile_slots"),
                frame_real_fraction=frac("frames_real", "frame_slots"),
                examples=tot["examples"], skipped=len(getattr(it, "skipped", {}) or {}),
                host_examples_per_s=tot["examples"] / dt, peak_rss_gib=peak_rss_gib())


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (GiB; Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


class _SlowData:
    """A data iterator that takes ``delay`` more seconds per batch (the host side of bench pipeline)."""

    def __init__(self, it, delay: float):
        self.it, self.delay = it, delay

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.delay)
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def bench_pipeline(config) -> dict:
    """Does the trainer overlap its input pipeline with the step? Runs the real trainer on the tiny
    stage 2.2 set with a source made ``config.bench.host_delay`` s slower per batch and a step made
    ``config.bench.step_delay`` s slower (the loop's thread sleeps before dispatch, as it would wait
    on a busy device), with the pipeline's prefetch on and off; reports the median step period,
    the median data wait and what full overlap (the larger delay) and none (their sum) would give."""
    b = config.bench
    host, dev, steps = (float(b.get("host_delay", 0.4)), float(b.get("step_delay", 0.4)),
                        int(b.get("pipeline_steps", 12)))
    out = dict(host_delay_s=host, step_delay_s=dev, steps=steps)
    for prefetch in (2, 0):
        c = stages.stage_config("2.2", "tiny")
        c.update(total_steps=steps, checkpoint_every=10 * steps)
        c.data.prefetch = prefetch
        data, _ = synthetic.synthetic_data(c)

        def slow_step(step_fn):
            def run(state, batch):
                time.sleep(dev)
                return step_fn(state, batch)
            return run
        with tempfile.TemporaryDirectory() as wd:
            trainer.train(c, wd, data=_SlowData(data, host), log=lambda *_: None, progress=False, wrap_step=slow_step)
            with open(f"{wd}/metrics.jsonl") as f:
                lines = [json.loads(x) for x in f][2:]  # the first steps compile
        key = "prefetch" if prefetch else "serial"
        out[f"{key}_step_s"] = float(np.median([m["step_s"] for m in lines]))
        out[f"{key}_data_wait_s"] = float(np.median([m["data_wait_s"] for m in lines]))
    out["overlap_bound_s"], out["serial_bound_s"] = max(host, dev), host + dev
    return out


def format_table(res: dict) -> str:
    def f(v, fmt):
        return "n/a" if v is None else fmt.format(v)
    rows = [
        ("device", f"{res['device']} x{res['n_devices']}"),
        ("model", f"{res['config']['layers']} layers, hidden {res['config']['hidden']}, "
                  f"{res['config']['params'] / 1e6:.1f}M params, {res['config']['dtype']}, "
                  f"remat {res['config']['remat']}"),
        ("train batch x seq", f"{res['batch']} x {res['seq_len']}"),
        ("train step", f"{res['step_time_s'] * 1e3:.1f} ms"),
        ("train tokens/s", f"{res['tokens_per_s']:.0f}"),
        ("model TFLOPs / step", f"{res['model_tflops_per_step']:.3f}"),
        ("TFLOP/s / device", f"{res['tflops_per_s_per_device']:.2f}"),
        ("MFU", f(res['mfu'], "{:.1%}")),
        ("decode tokens/s (batch %d)" % res["decode_batch"], f"{res['decode_tokens_per_s']:.1f}"),
        ("decode HBM roofline fraction", f(res['decode_roofline_fraction'], "{:.1%}")),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


WHAT = ("llm", "convert", "data", "pipeline", "mixture", "eval", "serve", "codec", "narrow", "accel")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in WHAT:
        print(f"usage: python -m vita_jax.bench {'|'.join(WHAT)} --config=NAME|FILE.py [--config.x=y] [--json=OUT]",
              file=sys.stderr)
        return 2
    what, rest = argv[0], argv[1:]
    if what == "serve":  # its own options: python -m vita_jax.bench serve --help
        from vita_jax.bench import serve  # imports the server (websockets) only for this bench
        return serve.main(rest)
    if what == "codec":  # its own options: python -m vita_jax.bench codec --help
        return codec.main(rest)
    if what == "narrow":  # its own options: python -m vita_jax.bench narrow --help
        return narrow.main(rest)
    if what == "accel":  # its own options: python -m vita_jax.bench accel --help
        from vita_jax.bench import accel  # imports this module's helpers: loaded after them
        return accel.main(rest)
    config, rest = config_lib.parse_args(rest, default="tiny")
    out, opts = None, {}
    for a in rest:
        if a.startswith("--json="):
            out = a.split("=", 1)[1]
        elif what == "mixture" and a.split("=", 1)[0] in ("--out", "--n", "--seed") and "=" in a:
            opts[a[2:].split("=", 1)[0]] = a.split("=", 1)[1]
        elif what == "eval" and a.split("=", 1)[0] in ("--checkpoint", "--n", "--batch", "--tokens") and "=" in a:
            opts[a[2:].split("=", 1)[0]] = a.split("=", 1)[1]
        else:
            print(f"unknown argument {a}", file=sys.stderr)
            return 2
    if what == "mixture":
        if "out" not in opts:
            print("bench mixture needs --out=DIR", file=sys.stderr)
            return 2
        path = mixture.write_mixture(opts["out"], int(opts.get("n", 400)), int(opts.get("seed", 0)))
        print(json.dumps(dict(mixture=path, media_root=opts["out"])))
        return 0
    if what == "eval":
        if "checkpoint" not in opts:
            print("bench eval needs --checkpoint=DIR (a release folder with tokenizer.json)", file=sys.stderr)
            return 2
        res = evalgen.bench_eval(opts["checkpoint"], int(opts.get("n", 24)), int(opts.get("batch", 8)),
                                 int(opts.get("tokens", 16)))
        print(json.dumps(res))
    elif what in ("data", "pipeline"):
        res = bench_data(config) if what == "data" else bench_pipeline(config)
        print(json.dumps(res))
    elif what == "convert":
        res = bench_convert(config)
        for k, v in res.items():
            print(f"{k:32s} {v / 2 ** 20:10.1f} MiB" if k.endswith("bytes") else f"{k:32s} {v:10.2f}")
    else:
        res = bench_llm(config)
        print(format_table(res))
    if out:
        with open(out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
