"""Diagnosis of issue #24 item 2: which pre-activations of the official MSD[0] (spectral-normed
``DiscriminatorS``) lie within float32 rounding of LeakyReLU's kink on a stage-3.1 batch, and how much
the D-update gradient of ``convs.0`` moves when float32 rounding puts one on the other side.

    python tests/data/ticodec_msd_kinks.py --ticodec /tmp/ticodec --fix DIR [--step 0] [--tau 2e-7]

``DIR``: a ``fixtures/ticodec-train``-like folder (``reference/inputs.npz`` + ``reference/step0.npz``) or a
variant run folder (``runs/ref.npz``). Runs the official module (real batch, then the official ŷ, as
``MultiScaleDiscriminator.forward`` does) in float32 and float64 and prints, per layer, the units with
``|x64| < tau · max|x|`` (tau: the float32 rounding of these convolutions, ~1e-6 of the layer max at
worst, ~5e-8 typical), the sign float32 gives them, and the relative change of the convs.0 gradient if
that unit alone is moved across 0 (float64). Upstream's own f32-vs-f64 spread of the gradient is printed
too: a unit that float32 places on the wrong side shows up there as a jump of about its effect.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ticodec", required=True)
    ap.add_argument("--fix", required=True)
    ap.add_argument("--step", type=int, default=0)
    ap.add_argument("--tau", type=float, default=2e-7)
    a = ap.parse_args()
    sys.path.insert(0, HERE)
    from make_ticodec_variant import shims
    shims(a.ticodec)
    import torch
    from academicodec.models.ticodec import models as m
    k = a.step
    run = os.path.join(a.fix, "runs", "ref.npz")
    if os.path.exists(run):
        r = np.load(run)
        y, yh = r[f"s{k}.batch.y"][:, None], r[f"s{k}.gen.y_hat"]
        ref = r[f"u{k}.msd.discriminators.0.convs.0.weight_orig.grad"]
    else:
        y = np.load(os.path.join(a.fix, "reference", "inputs.npz"))[f"s{k}.batch.y"][:, None]
        yh = np.load(os.path.join(a.fix, "reference", f"step{k}.npz"))["gen.y_hat"]
        ref = None
    sd = torch.load(os.path.join(a.fix, "do_00000000"), weights_only=True)["msd"]
    sd0 = {n[len("discriminators.0."):]: v for n, v in sd.items() if n.startswith("discriminators.0.")}

    def grad(dt, delta=None):
        """convs.0 weight gradient of mean((1-D(y))²) + mean(D(ŷ)²); pre-activations (path, layer) -> array;
        ``delta`` = (path, layer, index, value) added to one pre-activation."""
        d = m.DiscriminatorS(use_spectral_norm=True)
        d.load_state_dict(sd0)
        d = d.to(dt).train()
        pre, path = {}, ["real"]

        def hook(j):
            def f(mod, i, o):
                pre[(path[0], j)] = o.detach().double().numpy()
                if delta and delta[:2] == (path[0], j):
                    o = o.clone()
                    o[delta[2]] += delta[3]
                    return o
            return f
        for j, c in enumerate(d.convs):
            c.register_forward_hook(hook(j))
        dr, _ = d(torch.tensor(y, dtype=dt))
        path[0] = "fake"
        dg, _ = d(torch.tensor(yh, dtype=dt))
        (torch.mean((1 - dr) ** 2) + torch.mean(dg ** 2)).backward()
        return d.convs[0].weight_orig.grad.double().numpy(), pre

    rel = lambda u, v: np.abs(u - v).max() / np.abs(v).max()  # noqa: E731
    g32, p32 = grad(torch.float32)
    g64, p64 = grad(torch.float64)
    print(f"official MSD[0] convs.0 gradient, float32 vs float64: {rel(g32, g64):.2e}"
          + (f"; float32 vs the run's: {rel(g32, ref):.2e}" if ref is not None else ""))
    for key in sorted(p64):
        x64, x32 = p64[key], p32[key]
        scale = np.abs(x64).max()
        for idx in (tuple(int(i) for i in ix) for ix in np.argwhere(np.abs(x64) < a.tau * scale)):
            g, _ = grad(torch.float64, (key[0], key[1], idx, -2.0 * x64[idx]))
            print(f"{key[0]} convs.{key[1]} unit {idx}: x64 = {x64[idx]:.3e} ({x64[idx] / scale:.1e} of max), "
                  f"x32 = {x32[idx]:.3e} ({'same side' if np.sign(x32[idx]) == np.sign(x64[idx]) else 'FLIPPED'}); "
                  f"moving it across 0 changes the gradient by {rel(g, g64):.2e}")


if __name__ == "__main__":
    main()
