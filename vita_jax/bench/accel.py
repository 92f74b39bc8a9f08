"""``python -m vita_jax.bench accel``: one command that measures what the accelerator issues need, on whatever
device is present, and prints ONE JSON line (device, platform, jax version, date, each part's figures or error).

Parts, each in its own ``try`` (a failure is reported in its ``error`` field and the next part runs), each skipped
when the time left under ``--budget-s`` is below its estimate:

* ``train``: the stage 2.2 train step (projector, speech adapter and LLM train; ViT and whale encoder frozen,
  forward only) of a VITA with the Qwen2.5-1.5B LLM and the real tower sizes (InternViT-300M at 448 px, the
  24-block whale encoder), random weights, bf16 compute, on packed rows of 4096 positions made of synthetic
  examples (text, 1-2 tiles, half of them a speech clip). Reports step time, useful tokens/s (positions that
  hold an example, not padding) and MFU counting only useful work: the LLM per example segment (causal attention
  within it), the towers on the real tiles and frames (:mod:`vita_jax.train.flops`' accounting); and the
  same over every allocated slot (``mfu_allocated``).
* ``decode``: cached greedy decoding of the Qwen2.5-7B LLM shape (28 layers, 3584 wide, 28/4 heads, MLP 18944,
  vocabulary 152064; ``--decode-layers`` cuts layers when memory is short) with random bf16 weights at batch 1
  and 8: ms per step against the HBM roofline = (weight bytes + KV cache bytes) / HBM bandwidth, both for the
  layers that ran.
* ``serve``: the live serve loop on a random VITA of the 7B shape with its speech decoder and codec: speech end ->
  first text / first audio (:mod:`vita_jax.bench.accel_serve`; needs the Qwen2.5 tokenizer, ``--tokenizer``).

A watchdog at ``--hard-s`` writes what was measured if a part hangs (exit status 3).
``--small`` (the default on CPU): tiny shapes (the tests' mode): train and decode in 30-80 s on 2 cores, serve ~1 min.
Peaks: :data:`vita_jax.train.flops.PEAKS` by ``device_kind``; unknown kinds report raw figures, MFU null.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from vita_jax import config as config_lib
from vita_jax import parallel
from vita_jax.bench import batch_usage, time_decode
from vita_jax.data import packing
from vita_jax.models import qwen2, vita
from vita_jax.models.vita import AUDIO_TOKEN_INDEX, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vita_jax.models.whale import llm_length
from vita_jax.train import setup
from vita_jax.train.flops import device_peaks, llm_forward_flops, step_flops

QWEN_1P5B = dict(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True)
QWEN_7B = dict(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, intermediate_size=18944, tie_word_embeddings=False)
# the small (CPU) shapes: a 2-layer, 64-wide LLM, tiny towers (configs/tiny.py)
SMALL_LLM = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, tie_word_embeddings=False)
# seconds a part needs at least (compile included) before it is started: (full size, small)
ESTIMATE_S = dict(train=150, decode=90, serve=150)
ESTIMATE_SMALL_S = dict(train=5, decode=5, serve=10)


# ------------------------------------------------------------------------------------------------ train
def train_config(small: bool, seq_len: int, rows: int):
    """Stage 2.2 with the 1.5B LLM and the real towers (``small``: the tiny model), packed, bf16, one
    micro-batch of ``rows`` rows a step."""
    c = config_lib.load_config("stage2_2:tiny" if small else "stage2_2")
    c.llm.update(SMALL_LLM if small else QWEN_1P5B)
    if not small:
        c.dtype, c.remat_policy = "bfloat16", "dots_no_batch"
    c.update(batch_size=rows, grad_accum=1, total_steps=100)
    c.data.update(seq_len=seq_len, packing=True)
    return c


def synthetic_examples(config, n: int, seed: int = 0) -> list:
    """``n`` examples in the spliced-id format, each about a fifth of a row: text, 1-4 image tiles (fewer when
    tiles are large against the row), and a speech clip in every other one."""
    vc, rng = vita.vision_config(config), np.random.default_rng(seed)
    L, tpt, s = int(config.data.seq_len), vc.tokens_per_tile, vc.image_size
    max_frames = clip_frames(config)
    out = []
    for i in range(n):
        tiles = int(rng.integers(1, 1 + max(1, min(4, L // (8 * tpt)))))
        frames = int(rng.integers(max_frames // 4, max_frames + 1)) if i % 2 else 0
        spare = L // 5 - tiles * tpt - (int(llm_length(frames)) if frames else 0)
        text = max(8, int(rng.integers(spare // 2, spare + 1)) if spare > 16 else 8)
        ids = [int(x) for x in rng.integers(10, config.llm.vocab_size, text)]
        ids[1:1] = [IMAGE_TOKEN_INDEX] * tiles + ([AUDIO_TOKEN_INDEX] if frames else [])
        labels = np.full(len(ids), IGNORE_INDEX, np.int64)
        labels[-text // 2:] = ids[-text // 2:]
        ex = dict(input_ids=np.asarray(ids, np.int64), labels=labels,
                  pixels=rng.normal(0, 1, (tiles, 3, s, s)).astype(np.float32))
        if frames:
            ex["audio"] = rng.normal(0, 1, (frames, 80)).astype(np.float32)
        out.append(ex)
    return out


def clip_frames(config) -> int:
    """The longest synthetic speech clip (its slot length): 10 s (1000 fbank frames), less on short rows."""
    return int(min(config.data.max_frames, 1000, 8 * int(config.data.seq_len) // 10))


def packed_batch(config, rows: int) -> dict:
    """One packed host batch of ``rows`` rows: synthetic examples first-fit by length into the rows, within
    8 tiles and 3 clips a row (slots the model computes whether filled or not)."""
    vc, L = vita.vision_config(config), int(config.data.seq_len)
    budget = packing.Budget(rows, L, 8 * rows, 3 * rows, clip_frames(config), vc.tokens_per_tile, vc.image_size)
    exs = synthetic_examples(config, 8 * rows)
    order = sorted(range(len(exs)), key=lambda i: -budget.length(exs[i]))
    placed, _ = packing.place(exs, budget, order)
    return packing.pack(exs, placed, budget)


def useful_flops(config, batch: dict) -> tuple[float, float]:
    """``(useful, allocated)`` model FLOPs of one step on ``batch``: useful = the LLM per example segment
    (causal attention inside it) + the towers on the real tiles and frames; allocated = every position, tile slot
    and frame slot (:func:`vita_jax.train.flops.step_flops`)."""
    lc, u = vita.llm_config(config), batch_usage(batch, vita.vision_config(config).tokens_per_tile)
    seg = np.asarray(batch["segment_ids"])
    lens = [int((r == s).sum()) for r in seg for s in np.unique(r[r > 0])]
    llm = 3 * sum(llm_forward_flops(lc, 1, n) for n in lens)
    towers = step_flops(config, 0, 1, u["tiles_real"], u["frames_real"])
    rows, L = seg.shape
    return llm + towers, step_flops(config, rows, L, u["tile_slots"], u["frame_slots"])


def bench_train(small: bool, seq_len: int, rows: int, steps: int) -> dict:
    config = train_config(small, seq_len, rows)
    mesh = parallel.make_mesh(dict(config.mesh_shape))
    host = packed_batch(config, rows)
    t0 = time.perf_counter()
    state, step, info = setup.build(config, vita.init_params(config, seed=0), mesh=mesh)
    batch = info["place"](host)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, m = step(state, batch)
    loss0 = float(m["loss"])
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    loss = float(m["loss"])  # waits for the last step
    dt = (time.perf_counter() - t0) / steps
    useful, allocated = useful_flops(config, host)
    u = batch_usage(host, vita.vision_config(config).tokens_per_tile)
    peak, _ = device_peaks(jax.devices()[0].device_kind)
    n = mesh.size
    lc = vita.llm_config(config)
    return dict(llm=dict(layers=lc.num_hidden_layers, hidden=lc.hidden_size, vocab=lc.vocab_size),
                vision_layers=vita.vision_config(config).num_hidden_layers, dtype=str(config.dtype),
                remat=str(config.remat_policy), attention_impl=str(config.attention_impl),
                params=int(sum(x.size for x in jax.tree.leaves(state.train)) +
                           sum(x.size for x in jax.tree.leaves(state.frozen))),
                rows=rows, seq_len=seq_len, examples=u["examples"], useful_tokens=u["llm_real"],
                tiles=[u["tiles_real"], u["tile_slots"]], frames=[u["frames_real"], u["frame_slots"]],
                init_s=init_s, compile_s=compile_s, steps=steps, step_s=dt, loss_first=loss0, loss_last=loss,
                useful_tokens_per_s=u["llm_real"] / dt, allocated_tokens_per_s=rows * seq_len / dt,
                useful_tflops_per_step=useful / 1e12, allocated_tflops_per_step=allocated / 1e12,
                useful_tflops_per_s_per_device=useful / dt / n / 1e12,
                mfu=useful / dt / n / peak if peak else None,
                mfu_allocated=allocated / dt / n / peak if peak else None)


# ----------------------------------------------------------------------------------------------- decode
def decode_config(small: bool, layers: int):
    """The 7B LLM shape (``small``: the tiny one) in bf16, parameters stored in bf16."""
    c = config_lib.load_config("vita15")
    c.llm.update(SMALL_LLM if small else QWEN_7B)
    if layers:
        c.llm.num_hidden_layers = int(layers)
    c.dtype = c.param_dtype = "bfloat16"
    c.remat_policy = "none"
    return c


def _decode_ms(module, params, cfg, batch: int, prompt: int, ntok: int) -> tuple[float, int]:
    """``(ms per decode step, KV cache bytes)`` of greedy cached decoding at ``batch`` rows."""
    rng = np.random.default_rng(batch)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt)), jnp.int32)
    dt, cache = time_decode(module, params, cfg, ids, ntok)
    kv = sum(x.size * x.dtype.itemsize for x in (cache.k, cache.v))
    return dt * 1e3, int(kv)


def bench_decode(small: bool, layers: int, batches, prompt: int, ntok: int) -> dict:
    config = decode_config(small, layers)
    cfg = vita.llm_config(config)
    mesh = parallel.make_mesh(dict(config.mesh_shape))
    module = qwen2.Qwen2ForCausalLM(cfg)
    t0 = time.perf_counter()
    params = vita.init_module(module, mesh)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    weight_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
    _, bw = device_peaks(jax.devices()[0].device_kind)
    bw = bw * mesh.size if bw else None
    out = dict(llm=dict(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=[cfg.num_attention_heads,
               cfg.num_key_value_heads], mlp=cfg.intermediate_size, vocab=cfg.vocab_size),
               params=int(sum(x.size for x in jax.tree.leaves(params))), weight_bytes=weight_bytes,
               prompt_len=prompt, tokens=ntok, init_s=init_s, hbm_bytes_per_s=bw)
    with parallel.use_mesh(mesh):
        for b in batches:
            ms, kv = _decode_ms(module, params, cfg, b, prompt, ntok)
            roof = (weight_bytes + kv) / bw * 1e3 if bw else None
            out[f"batch{b}"] = dict(ms_per_step=ms, tokens_per_s=b / ms * 1e3, kv_cache_bytes=kv,
                                    roofline_ms=roof, roofline_fraction=roof / ms if roof else None)
    return out


# ------------------------------------------------------------------------------------------------- main
def _parts(a) -> list:
    """``(name, thunk)`` of every part asked for."""
    b = [int(x) for x in a.decode_batches.split(",") if x.strip()]
    return [(name, fn) for name, fn in (
        ("train", lambda: bench_train(a.small, a.seq_len, a.rows, a.steps)),
        ("decode", lambda: bench_decode(a.small, a.decode_layers, b, a.prompt_len, a.decode_tokens)),
        ("serve", lambda: _serve(a)),
    ) if name in a.parts.split(",")]


def _serve(a) -> dict:
    from vita_jax.bench import accel_serve  # the server (websockets): imported when this part runs
    return accel_serve.bench_serve(a.small, a.decode_layers, a.tokenizer or accel_serve.default_tokenizer(),
                                   a.serve_turns)


class _Report:
    """Writes the JSON line (stdout, ``--json``) once: at the end, or from the watchdog when the run passes
    ``--hard-s`` (a part that hangs or overruns: what was measured so far, the running part marked as timed out;
    then the process exits with status 3, so that a device session's time limit never loses the figures)."""

    def __init__(self, a):
        self.a, self.lock, self.done = a, threading.Lock(), False

    def write(self, res: dict) -> bool:
        with self.lock:
            if self.done:
                return False
            self.done = True
        line = json.dumps(res)
        print(line, flush=True)
        if self.a.json:
            with open(self.a.json, "w") as fh:
                fh.write(line + "\n")
        return True

    def watch(self, res: dict, t_start: float) -> threading.Timer:
        def fire():
            out = dict(res)
            part = out.pop("running", None)
            if part is not None:
                out[part] = dict(error=f"timed out: the run passed --hard-s={self.a.hard_s} while this part ran")
            out["wall_s"] = round(time.perf_counter() - t_start, 1)
            if self.write(out):
                os._exit(3)
        t = threading.Timer(self.a.hard_s, fire)
        t.daemon = True
        t.start()
        return t


def run(a, report: _Report) -> dict:
    dev = jax.devices()[0]
    peak, bw = device_peaks(dev.device_kind)
    res = dict(bench="accel", device=dev.device_kind, platform=dev.platform, n_devices=jax.device_count(),
               jax=jax.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               small=a.small, budget_s=a.budget_s, peak_tflops=peak / 1e12 if peak else None,
               hbm_gbps=bw / 1e9 if bw else None, options={k: v for k, v in vars(a).items() if k != "json"})
    t_start = time.perf_counter()
    timer = report.watch(res, t_start)
    est = ESTIMATE_SMALL_S if a.small else ESTIMATE_S
    for name, fn in _parts(a):
        left = a.budget_s - (time.perf_counter() - t_start)
        if left < est[name]:
            res[name] = dict(skipped=f"{left:.0f} s left of --budget-s={a.budget_s}, the part needs about {est[name]}")
            continue
        t0 = time.perf_counter()
        res["running"] = name
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 (one part's failure is reported, the next part runs)
            out = dict(error=f"{type(e).__name__}: {str(e)[:2000]}")
        out["wall_s"] = round(time.perf_counter() - t0, 1)
        res[name] = out
        del res["running"]
        gc.collect()
    timer.cancel()
    res["wall_s"] = round(time.perf_counter() - t_start, 1)
    return res


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vita_jax.bench accel", description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action=argparse.BooleanOptionalAction, default=None,
                   help="tiny shapes (default: on when the platform is cpu)")
    p.add_argument("--parts", default="train,decode,serve", help="which parts, comma-separated (train, decode, serve)")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip a part that would not fit in what is left")
    p.add_argument("--hard-s", type=float, default=None, help="past this, write what was measured and exit with "
                   "status 3 (default --budget-s + 150)")
    p.add_argument("--seq-len", type=int, default=None, help="packed row length (default 4096; small: 256)")
    p.add_argument("--rows", type=int, default=None, help="rows a train step (default 2; small: 2)")
    p.add_argument("--steps", type=int, default=None, help="timed train steps after the first (default 5; small: 1)")
    p.add_argument("--decode-layers", type=int, default=0, help="LLM layers of the decode and serve parts (0: all)")
    p.add_argument("--decode-batches", default="1,8")
    p.add_argument("--prompt-len", type=int, default=None, help="decode prompt (default 512; small: 16)")
    p.add_argument("--decode-tokens", type=int, default=None, help="timed decode steps (default 64; small: 4)")
    p.add_argument("--serve-turns", type=int, default=None,
                   help="turns of the serve part after its warm-up, the last interrupted (default 3; small: 2)")
    p.add_argument("--tokenizer", default=None, help="Qwen2.5 tokenizer folder of the serve part (default: the "
                   "fixtures' one, $VITA_SHARED/fixtures/qwen2.5-tokenizer or ../shared/fixtures beside the checkout)")
    p.add_argument("--json", default=None, help="also write the JSON to this file")
    return p


def main(argv) -> int:
    a = parser().parse_args(argv)
    if a.small is None:
        a.small = jax.devices()[0].platform == "cpu"
    small = dict(seq_len=256, rows=2, steps=1, prompt_len=16, decode_tokens=4, serve_turns=2)
    full = dict(seq_len=4096, rows=2, steps=5, prompt_len=512, decode_tokens=64, serve_turns=3)
    for k, v in (small if a.small else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    bad = sorted(set(a.parts.split(",")) - set(ESTIMATE_S))
    if bad:
        parser().error(f"--parts: unknown {bad}; parts: {', '.join(ESTIMATE_S)}")
    a.hard_s = a.budget_s + 150 if a.hard_s is None else a.hard_s
    report = _Report(a)
    report.write(run(a, report))
    return 0
