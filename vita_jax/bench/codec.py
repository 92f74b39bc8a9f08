"""``python -m vita_jax.bench codec [--batch 160] [--seconds 1] [--measure N]``: the cost of one stage 3.1
step (TiCodec GAN training, :mod:`vita_jax.train.codec.step`) at real size.

The model is VITA-1.5's released codec (:func:`vita_jax.models.ticodec.real_size_config`;
``--model-json`` for another) with the three discriminator families. Reported:

* parameters per part, from the abstract state (``jax.eval_shape``: nothing allocated);
* FLOPs per step from XLA's cost analysis of the jitted step, lowered with abstract inputs
  (``jax.ShapeDtypeStruct``) and compiled for this host's backend (``--xla=lower``: the unoptimised
  HLO only, seconds instead of minutes; ``--xla-batch N``: analysed at N and scaled linearly, with
  the linearity checked on the lowered HLO at both batches);
* an analytic count of the convolutions and matmuls (:func:`analytic`): each part's forward per
  sample times what the step does with it. Generator 3x (forward + backward); encoder 3x on crop 1
  plus 1x for the detached global crop (stages 1-2 and the global branch); VQ distances 1x; each
  discriminator family 9x: the D update runs it on ``y`` and ``sg(ŷ)`` with parameter gradients
  (2 x 3x), the G update on ``y`` (1x) and on ``ŷ`` with input gradients (2x). Mels / STFTs
  (FFTs), norms and activations are not counted; as in XLA's count, a convolution's taps on its
  zero padding (and on the zeros between a transposed conv's inputs) are not either;
* a time per step on an H100 SXM at a fraction (``--mfu``, 0.4) of its dense peaks: TF32 tensor
  cores (what XLA uses for float32 convolutions by default on GPU) and plain FP32 (precision
  "highest"); and XLA's bytes accessed at the H100's HBM speed (the CPU compiler's fusion, so only
  a rough floor for a GPU);
* ``--measure N``: N timed steps (after one compile + warm-up step) on the default device, with
  random audio: step time, samples/s, audio seconds/s.

Prints a table, then one JSON line (also written to ``--json``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from vita_jax.models import discriminators as dm
from vita_jax.models import ticodec as tt
from vita_jax.sizes import ceil_div
from vita_jax.train.codec import step as cs

# H100 SXM dense peaks (vendor figures, FLOP/s): TF32 tensor cores, plain FP32; HBM bytes/s
H100_TF32, H100_FP32, H100_HBM = 494.7e12, 66.9e12, 3.35e12
D_MULT = 9            # per discriminator family (module docstring)
G_MULT = 3            # generator, encoder on crop 1
PARTS = (("generator", "gp"), ("encoder", "gp"), ("quantizer", "gp"), ("mpd", "dp"), ("msd", "dp"), ("mstftd", "dp"))


def _conv(n: int, k: int, s: int = 1, p: int = 0, d: int = 1, lhs: int = 1) -> tuple[int, int]:
    """``(output length, taps)`` of a convolution over ``n`` positions (kernel ``k``, stride ``s``,
    padding ``p`` both sides, dilation ``d``; ``lhs``: input dilation, a transposed conv): taps are the
    (output, kernel) pairs that meet a real input, not padding or the zeros of the input dilation."""
    m = (n - 1) * lhs + 1
    n_out = (m + 2 * p - d * (k - 1) - 1) // s + 1
    pos = np.arange(n_out)[:, None] * s - p + np.arange(k)[None, :] * d
    return n_out, int(np.sum((pos >= 0) & (pos < m) & (pos % lhs == 0)))


def _resblocks(t: int, ch: int, kernels, dilations) -> float:
    """The ResBlock1s of one stage at length ``t``: per dilation a dilated and a plain conv ch -> ch."""
    return sum(2.0 * ch * ch * (_conv(t, k, p=(k * d - d) // 2, d=d)[1] + _conv(t, k, p=(k - 1) // 2)[1])
               for k, ds in zip(kernels, dilations) for d in ds)


def generator_flops(c, frames: int) -> float:
    """One forward, one sample of ``frames`` code frames."""
    ch, t = c.upsample_initial_channel, frames
    f = 2.0 * c.code_dim * ch * _conv(t, 7, p=3)[1]
    for u, k in zip(c.upsample_rates, c.upsample_kernel_sizes):
        t, taps = _conv(t, k, p=k - 1 - (k - u) // 2, lhs=u)
        f += 2.0 * ch * (ch // 2) * taps
        ch //= 2
        f += _resblocks(t, ch, c.resblock_kernel_sizes, c.resblock_dilation_sizes)
    return f + 2.0 * ch * _conv(t, 7, p=3)[1]


def encoder_flops(c, length: int) -> tuple[float, float]:
    """``(crop 1, global crop)`` forwards of one sample: the whole encoder with the global branch, and
    stages 1-2 + the global branch (the detached second crop)."""
    stages = list(reversed(list(zip(c.upsample_rates, c.upsample_kernel_sizes))))
    kernels, dils = list(reversed(c.resblock_kernel_sizes)), list(reversed(c.resblock_dilation_sizes))
    half, t, f = len(stages) // 2, length, 2.0 * 32 * _conv(length, 7, p=3)[1]
    first = gte = 0.0
    for i, (u, k) in enumerate(stages):
        ch = 32 * 2 ** (i + 1)
        t, taps = _conv(t, k, u, (k - u) // 2)
        f += 2.0 * (ch // 2) * ch * taps + _resblocks(t, ch, kernels, dils)
        if i == half - 1:
            first = f
            cin, hid, cout, kk, s = c.global_feature_conv
            tg = t
            for i_, o_ in ((cin, hid), (hid, hid), (hid, cout)):
                tg, taps = _conv(tg, kk, s, (kk - s) // 2)
                gte += 2.0 * i_ * o_ * taps
            gte += 2.0 * cout * cout
    f += 2.0 * c.code_dim * c.code_dim * _conv(t, 3, p=1)[1]
    return f + gte, first + gte


def quantizer_flops(c, frames: int) -> float:
    """Distances to every codebook row (the ``x @ e.T`` of the nearest-neighbour search)."""
    return 2.0 * frames * c.code_dim * c.n_codes + 2.0 * 128 * c.n_codes


def mpd_flops(length: int) -> float:
    f = 0.0
    chans = (1, 32, 128, 512, 1024, 1024)
    for p in dm.PERIODS:
        h = ceil_div(length, p)
        for j in range(5):
            h, taps = _conv(h, 5, 3 if j < 4 else 1, 2)
            f += 2.0 * p * chans[j + 1] * chans[j] * taps
        f += 2.0 * p * 1024 * _conv(h, 3, p=1)[1]
    return f


def msd_flops(length: int) -> float:
    f, t = 0.0, length
    for i in range(3):
        if i:
            t = _conv(t, 4, 2, 2)[0]  # AvgPool1d(4, 2, padding=2)
        tt_ = t
        for o, i_, k, s, g, p in dm._S_CONVS + ((1, 1024, 3, 1, 1, 1),):
            tt_, taps = _conv(tt_, k, s, p)
            f += 2.0 * o * (i_ // g) * taps
    return f


def mstftd_flops(length: int, filters: int = 32) -> float:
    """2-D convs over (frames, frequencies): taps are the products of both axes' taps."""
    f = 0.0
    for n in dm.STFT_NFFTS:
        fr, fq = (length - n) // (n // 4) + 1, n // 2 + 1
        fq, tq = _conv(fq, 9, p=4)
        f += 2.0 * filters * 2 * _conv(fr, 3, p=1)[1] * tq
        for d in (1, 2, 4):
            fq, tq = _conv(fq, 9, 2, 4)
            f += 2.0 * filters * filters * _conv(fr, 3, p=d, d=d)[1] * tq
        tq = _conv(fq, 3, p=1)[1]
        f += 2.0 * filters * (filters + 1) * _conv(fr, 3, p=1)[1] * tq
    return f


def analytic(cfg: tt.CodecTrainConfig, batch: int) -> dict:
    """``{part: (forward FLOPs of the batch, times in the step)}`` and ``step``: their weighted sum."""
    c, L = cfg.codec, cfg.segment_size
    frames = L // c.hop
    e1, e2 = encoder_flops(c, L)
    parts = dict(generator=(generator_flops(c, frames), G_MULT), encoder=(e1, G_MULT), encoder_global_crop=(e2, 1),
                 quantizer=(quantizer_flops(c, frames), 1), mpd=(mpd_flops(L), D_MULT), msd=(msd_flops(L), D_MULT),
                 mstftd=(mstftd_flops(L), D_MULT))
    parts = {k: (f * batch, m) for k, (f, m) in parts.items()}
    return dict(parts=parts, step=sum(f * m for f, m in parts.values()))


def abstract_state(M: cs.CodecModels):
    """The step's state as ``jax.ShapeDtypeStruct`` leaves (no weights allocated)."""
    return jax.eval_shape(lambda: cs.new_state(*cs.init_variables(M, 0)))


def param_counts(state) -> dict:
    return {n: int(sum(math.prod(x.shape) for x in jax.tree.leaves(state[side][n]))) for n, side in PARTS}


def abstract_batch(cfg: tt.CodecTrainConfig, batch: int) -> dict:
    y = jax.ShapeDtypeStruct((batch, cfg.segment_size), jnp.float32)
    return dict(y=y, y_global=y, y_mel=jax.eval_shape(lambda a: cs.mels(cfg, a), y))


def _cost(c) -> dict:
    c = c[0] if isinstance(c, (list, tuple)) else c
    return dict(flops=float(c.get("flops", 0.0)), bytes=float(c.get("bytes accessed", 0.0)))


def xla_cost(M: cs.CodecModels, state, batch: int, compile: bool = True) -> dict:
    """XLA's FLOPs and bytes of one step at ``batch`` (compiled for the default backend, or the
    lowered HLO only); with ``compile`` also the compiled buffer sizes and the times."""
    lr = jax.ShapeDtypeStruct((), jnp.float32)
    t0 = time.perf_counter()
    lowered = jax.jit(cs.make_step(M)).lower(state, abstract_batch(M.cfg, batch), lr)
    out = dict(batch=batch, lower_s=round(time.perf_counter() - t0, 2), lowered=_cost(lowered.cost_analysis()))
    if compile:
        t0 = time.perf_counter()
        comp = lowered.compile()
        out.update(compile_s=round(time.perf_counter() - t0, 2), compiled=_cost(comp.cost_analysis()))
        m = comp.memory_analysis()
        if m is not None:
            out["temp_bytes"] = int(m.temp_size_in_bytes)
            out["argument_bytes"] = int(m.argument_size_in_bytes)
    return out


def xla_forward(M: cs.CodecModels, state, batch: int) -> dict:
    """XLA's FLOPs (lowered HLO) of one forward of each part at ``batch``: the per-part check of
    :func:`analytic` (the encoder on crop 1 only, training mode)."""
    c, L, f32 = M.cfg.codec, M.cfg.segment_size, jnp.float32
    S = jax.ShapeDtypeStruct
    y = S((batch, 1, L), f32)
    gp, gb, dp, db = state["gp"], state["gb"], state["dp"], state["db"]
    fns = dict(generator=(lambda p, q, g: M.generator.apply({"params": p}, q, g),
                          (gp["generator"], S((batch, c.code_dim, L // c.hop), f32), S((batch, 128), f32))),
               encoder=(lambda p, b, x: M.encoder.apply({"params": p, "buffers": b}, x, mutable=["buffers"]),
                        (gp["encoder"], gb["encoder"], y)))
    for n in ("mpd", "msd", "mstftd"):
        fns[n] = (lambda p, b, x, n=n: getattr(M, n).apply({"params": p, "buffers": b}, x, mutable=["buffers"]),
                  (dp[n], db[n], y))
    return {n: _cost(jax.jit(f).lower(*args).cost_analysis())["flops"] for n, (f, args) in fns.items()}


def measure(M: cs.CodecModels, batch: int, steps: int, seed: int = 0) -> dict:
    """Runs ``steps`` real steps (after a compile + warm-up step) on the default device."""
    cfg = M.cfg
    state = cs.new_state(*cs.init_variables(M, seed))
    rng = np.random.default_rng(seed)
    y = jnp.asarray(0.1 * rng.standard_normal((batch, cfg.segment_size)), jnp.float32)
    yg = jnp.asarray(0.1 * rng.standard_normal((batch, cfg.segment_size)), jnp.float32)
    b = dict(y=y, y_global=yg, y_mel=jax.jit(lambda a: cs.mels(cfg, a))(y))
    step = jax.jit(cs.make_step(M), donate_argnums=(0,))
    lr = jnp.float32(cfg.learning_rate)
    t0 = time.perf_counter()
    state, met = step(state, b, lr)
    jax.block_until_ready(met)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        state, met = step(state, b, lr)
    jax.block_until_ready(met)
    dt = (time.perf_counter() - t0) / steps
    sec = cfg.segment_size / cfg.sampling_rate
    return dict(device=jax.devices()[0].device_kind, steps=steps, first_step_s=round(first, 2), step_s=dt,
                samples_per_s=batch / dt, audio_s_per_s=batch * sec / dt,
                finite=bool(np.isfinite(float(met["gen_loss_total"]))))


def run(cfg: tt.CodecTrainConfig, batch: int, xla: str = "compile", xla_batch: int | None = None,
        steps: int = 0, mfu: float = 0.4) -> dict:
    """The whole report as a dict (see the module docstring)."""
    M = cs.CodecModels.build(cfg)
    state = abstract_state(M)
    params = param_counts(state)
    a = analytic(cfg, batch)
    c = cfg.codec
    res = dict(config=dict(upsample_rates=list(c.upsample_rates), upsample_initial_channel=c.upsample_initial_channel,
                           resblock_kernel_sizes=list(c.resblock_kernel_sizes), n_codes=c.n_codes,
                           code_dim=c.code_dim, global_code_num=c.global_code_num, sampling_rate=c.sampling_rate),
               batch=batch, segment_size=cfg.segment_size, seconds=cfg.segment_size / c.sampling_rate,
               params=params, params_generator_side=sum(params[n] for n, s in PARTS if s == "gp"),
               params_discriminators=sum(params[n] for n, s in PARTS if s == "dp"),
               analytic_forward_gflops={k: f / 1e9 for k, (f, _) in a["parts"].items()},
               analytic_step_multiplier={k: m for k, (_, m) in a["parts"].items()},
               analytic_tflops_per_step=a["step"] / 1e12)
    flops = a["step"]
    if xla != "none":
        xb = xla_batch or batch
        res["xla_forward_gflops"] = {k: v / 1e9 for k, v in xla_forward(M, state, batch).items()}
        x = xla_cost(M, state, xb, compile=(xla == "compile"))
        scale = batch / xb
        got = x["compiled" if xla == "compile" else "lowered"]
        res.update(xla=x, xla_tflops_per_step=got["flops"] * scale / 1e12,
                   xla_tb_accessed_per_step=got["bytes"] * scale / 1e12,
                   xla_scaled_from_batch=xb if xb != batch else None)
        if xb != batch:  # linearity of the lowered count between the two batches
            lo = xla_cost(M, state, batch, compile=False)["lowered"]["flops"]
            res["xla_linearity"] = lo / (x["lowered"]["flops"] * scale)
        flops = got["flops"] * scale
        res["h100_hbm_s_per_step"] = got["bytes"] * scale / H100_HBM  # CPU fusion's bytes: a rough floor
        res["analytic_over_xla"] = a["step"] / flops
    res.update(flops_source="xla" if xla != "none" else "analytic", mfu_assumed=mfu,
               h100_tf32_s_per_step=flops / (mfu * H100_TF32), h100_fp32_s_per_step=flops / (mfu * H100_FP32))
    if steps:
        m = measure(M, batch, steps)
        m["tflops_per_s"] = flops / m["step_s"] / 1e12
        res["measured"] = m
    return res


def format_table(res: dict) -> str:
    p, g = res["params"], res["analytic_forward_gflops"]
    rows = [("batch x segment", f"{res['batch']} x {res['segment_size']} samples ({res['seconds']:g} s)")]
    rows += [(f"{k} params", f"{v / 1e6:.2f} M") for k, v in p.items()]
    xf = res.get("xla_forward_gflops", {})
    rows += [(f"{k} forward", f"{v:,.1f} GFLOP" + (f" (XLA {xf[k]:,.1f})" if k in xf else "")
              + f"  x{res['analytic_step_multiplier'][k]} in the step") for k, v in g.items()]
    rows.append(("analytic TFLOP / step", f"{res['analytic_tflops_per_step']:.2f}"))
    if "xla_tflops_per_step" in res:
        x = res["xla"]
        how = "compiled" if "compiled" in x else "lowered"
        src = f" (analysed at batch {x['batch']}, scaled)" if res.get("xla_scaled_from_batch") else ""
        rows.append((f"XLA TFLOP / step ({how})", f"{res['xla_tflops_per_step']:.2f}{src}; analytic/XLA "
                     f"{res['analytic_over_xla']:.3f}"))
        rows.append(("XLA TB accessed / step", f"{res['xla_tb_accessed_per_step']:.2f}"))
        if "xla_linearity" in res:
            rows.append(("XLA linearity (lowered)", f"{res['xla_linearity']:.4f}"))
        if "compile_s" in x:
            rows.append(("CPU lower / compile", f"{x['lower_s']:.0f} s / {x['compile_s']:.0f} s"))
    pct = f"{res['mfu_assumed']:.0%}"
    rows.append((f"H100 s / step at {pct} TF32", f"{res['h100_tf32_s_per_step']:.3f}"))
    rows.append((f"H100 s / step at {pct} FP32", f"{res['h100_fp32_s_per_step']:.3f}"))
    if "h100_hbm_s_per_step" in res:
        rows.append(("H100 s / step, XLA bytes at HBM speed", f"{res['h100_hbm_s_per_step']:.3f} (CPU fusion: rough)"))
    if "measured" in res:
        m = res["measured"]
        rows.append((f"measured on {m['device']}", f"{m['step_s'] * 1e3:.1f} ms / step, {m['samples_per_s']:.2f} "
                     f"samples/s, {m['audio_s_per_s']:.2f} audio s/s, {m['tflops_per_s']:.3f} TFLOP/s"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv) -> int:
    import argparse  # the bench's own options (python -m vita_jax.bench codec --help)
    p = argparse.ArgumentParser(prog="python -m vita_jax.bench codec")
    p.add_argument("--model-json", help="a TiCodec model.json (default: VITA-1.5's released codec)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's, 160)")
    p.add_argument("--seconds", type=float, default=None, help="segment length in seconds (default: the config's, 1)")
    p.add_argument("--xla", choices=("compile", "lower", "none"), default="compile",
                   help="XLA cost analysis of the compiled step, of the lowered HLO only, or none")
    p.add_argument("--xla-batch", type=int, default=None, help="analyse at this batch and scale linearly")
    p.add_argument("--measure", type=int, default=0, metavar="N", help="time N steps on the default device")
    p.add_argument("--mfu", type=float, default=0.4, help="fraction of the H100 peaks for the time estimate")
    p.add_argument("--json", help="also write the result to this file")
    a = p.parse_args(argv)
    try:
        cfg = tt.CodecTrainConfig.from_model_json(a.model_json) if a.model_json else tt.real_size_config()
    except ValueError as e:
        p.error(str(e))
    if a.seconds is not None:
        n = round(a.seconds * cfg.sampling_rate)
        if a.seconds <= 0 or n % cfg.codec.hop:
            p.error(f"--seconds {a.seconds}: {n} samples is not a positive multiple of the codec's hop {cfg.codec.hop}")
        cfg = dataclasses.replace(cfg, segment_size=n)
    for name in ("batch", "xla_batch"):
        if getattr(a, name) is not None and getattr(a, name) < 2:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: at least 2 (BatchNorm's unbiased variance)")
    if not 0 < a.mfu <= 1 or a.measure < 0:
        p.error("--mfu must lie in (0, 1] and --measure be >= 0")
    res = run(cfg, a.batch or cfg.batch_size, a.xla, a.xla_batch, a.measure, a.mfu)
    print(format_table(res))
    print(json.dumps(res))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0
