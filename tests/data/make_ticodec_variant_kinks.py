"""The kink term of a TiCodec variant's bounds (issue #24 item 2), from the official code only: a step of
``make_ticodec_variant.py``, run after its three official runs, in processes of its own; alone, on a variant
folder: ``python tests/data/make_ticodec_variant_kinks.py --ticodec /tmp/ticodec --out DIR`` (minutes).

A LeakyReLU unit whose pre-activation lies closer to 0 than float32 rounding reaches is on either side of the
kink by chance, in any float32 implementation, and a gradient behind it jumps by that unit's effect; the
official float64 / 1-thread reruns catch such a jump only when their own rounding happens to flip the unit.
So each compared array gets, besides 3x the rerun spread, what the official code's own near-kink units can
move it:

1. ``capture ref``: upstream ``train.main()`` in float32 (as the reference run, bitwise), step 0 only, with
   ``torch.nn.functional.leaky_relu`` observed: every call's pre-activation x32 is kept (``runs/lrelu/``).
2. ``capture f64``: the same in float64. Per call c (the same call of the same module in both runs):
   ``tau_c = 3 · max|x32 − x64| / max|x64|`` over the call's elements with ``|x64| ≤ 1e-3 · max|x64|`` (the
   official float32 rounding of that very tensor, everything upstream of it included, measured where a unit's
   side is decided, with the rule's factor 3; over all elements when none is that small), and the units with
   ``|x64| < tau_c · max|x64|`` -> ``runs/kink_units.json``. (The maximum over all elements, ``tau_all``, comes
   from the largest values, whose rounding is larger: on variant b its median over calls is 1.5e-6 against
   6.1e-7; taken as tau it listed 337 units instead of 110, and a kink term of 1.7e-2 instead of 6.4e-3 for
   MSD[0]'s first-layer gradient.) Covered: the discriminator calls of step 0's D update (``mpd`` / ``msd``
   call 0, ``mstftd`` calls 0-1): the only LeakyReLUs behind the D-update gradients, and, through the D
   update, behind everything after it. Not covered: the generator / encoder and the G update's discriminator
   calls (only the G-update gradients lie behind those).
3. ``subs``: for each unit, the official float32 step 0 of its sub-discriminator (MPD[j], MSD[j] and MS-STFT[j]
   have parameters, D-update loss terms and updated G-step logits of their own) rerun alone on the reference
   run's batch and ŷ (``sub_step``: D-update forward, loss term, backward, Adam's first step, G-update forward),
   once as is (asserted bitwise equal to the reference run) and once with that unit's slope swapped
   (1 <-> the negative slope; the output moves by ``|x|·(1 − slope)``, below rounding) -> the change of every
   stored array the sub-discriminator feeds: its rows of ``u0.d.grad_stats``, its selected gradients and its
   G-step logits.

``kink[key] = max over elements of Σ_units |Δ| / max|ref|`` for the step-0 arrays (0 where no covered unit feeds
the array): an upper bound for any subset of the units flipped, as far as their effects add (each unit lies
within ~1e-6 of its layer's max from 0, so a flip changes the backward pass at that unit only and the forward
values by rounding). Not covered (kink 0, bound 3x the spread alone): the G update's gradients ``u0.g.*`` and
the G-update losses, which also see the generator's / encoder's units and the G update's discriminator calls.
Step 1 is not rerun: its arrays inherit Adam's sign-like first step and have the fixture README §8 family
bounds (``tests/test_train_codec_variants.py``).
"""
import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
D_CALLS = {"mpd": (0,), "msd": (0,), "mstftd": (0, 1)}  # the D update's discriminator calls at step 0
FACTOR = 3.0  # the bound rule's factor, on the measured float32 rounding
NEAR = 1e-3  # the rounding is measured where a unit's side is decided: on the elements within 1e-3 of max|x| of 0


def _hook(mode, out):
    """A ``leaky_relu`` factory for ``run_official``: counts step 0's calls in order and, per ``mode``, keeps
    x32 (``capture-ref``) or compares x64 with it (``capture-f64``)."""
    from make_ticodec_variant_run import CTX
    state = {"n": 0, "units": []}
    folder = os.path.join(out, "runs", "lrelu")
    os.makedirs(folder, exist_ok=True)

    def factory(orig):
        def leaky_relu(x, negative_slope=0.01, inplace=False):
            if CTX["step"] != 0:
                return orig(x, negative_slope, inplace)
            c = state["n"]
            state["n"] += 1
            covered = CTX["top"] in D_CALLS and CTX["call"] in D_CALLS[CTX["top"]]
            if mode == "capture-ref" and covered:
                np.save(os.path.join(folder, f"{c}.npy"), x.detach().numpy())
            if mode == "capture-f64" and covered:
                x64 = x.detach().numpy()
                x32 = np.load(os.path.join(folder, f"{c}.npy")).astype(np.float64)
                scale = float(np.abs(x64).max())
                tau_all = FACTOR * float(np.abs(x32 - x64).max()) / scale
                small = np.abs(x64) <= NEAR * scale
                tau = FACTOR * float(np.abs(x32 - x64)[small].max()) / scale if small.any() else tau_all
                near = np.argwhere(np.abs(x64) < tau * scale)
                state["units"] += [dict(call=c, top=CTX["top"], tcall=CTX["call"], sub=CTX["sub"], shape=x.shape,
                                        index=[int(i) for i in ix], x64=float(x64[tuple(ix)]),
                                        x32=float(x32[tuple(ix)]), scale=scale, tau=tau) for ix in near]
                state.setdefault("taus", []).append(dict(call=c, top=CTX["top"], tcall=CTX["call"], sub=CTX["sub"],
                                                         tau=tau, tau_all=tau_all, n_small=int(small.sum()),
                                                         size=int(x64.size)))
            return orig(x, negative_slope, inplace)
        return leaky_relu
    return factory, state


def run(ticodec, out, mode):
    """One official run (a process of its own: dtype and hooks are global)."""
    import torch
    from make_ticodec_variant_run import run_official
    factory, state = _hook(mode, out)
    if mode == "capture-f64":
        torch.set_default_dtype(torch.float64)
    save = os.path.join(out, "runs", f"{mode}.npz")
    run_official(ticodec, out, "f64" if mode == "capture-f64" else "ref", lrelu=factory, steps=1, save=save)
    if mode == "capture-f64":
        with open(os.path.join(out, "runs", "kink_units.json"), "w") as f:
            json.dump(dict(units=state["units"], calls=state["taus"]), f, default=list)


def label(calls):
    """``(side, layer)`` of each covered call (``calls`` in order): a sub-discriminator's forward calls its
    LeakyReLU once per conv, consecutively; MPD / MSD run each sub on the real then the fake input within one
    call, MS-STFT takes them in calls 0 / 1."""
    out, runs = {}, []
    for c in calls:
        key = (c["top"], c["tcall"], c["sub"])
        if not runs or runs[-1][0] != key:
            runs.append((key, []))
        runs[-1][1].append(c["call"])
    for (top, tcall, _), cs in runs:
        n = len(cs) // 2 if top != "mstftd" else len(cs)
        for p, c in enumerate(cs):
            out[c] = (("real", "fake")[p // n if top != "mstftd" else tcall], p % n)
    return out


def sub_step(torch, mods, h, fam, j, y, yh, flip):
    """Upstream sub-discriminator ``j`` of ``fam`` through step 0 as ``train.py`` runs it, alone: the D update's
    real and fake forward (MSD: on the family's mean-pooled inputs), its ``discriminator_loss`` term, backward,
    Adam's first step, the G update's forward -> (gradients by parameter name, G-step real / fake logits).
    ``flip[(side, layer)]``: indices whose LeakyReLU slope is swapped in the D update. A sub-discriminator's
    parameters, D-update gradients and updated logits depend on its own term alone (the sum of the terms has
    gradient 1 on each)."""
    from academicodec.models.ticodec.models import discriminator_loss
    fam_mod = mods[fam]
    d = fam_mod.discriminators[j]
    if fam == "msd":
        for pool in fam_mod.meanpools[:j]:
            y, yh = pool(y), pool(yh)
    where = {"side": None, "n": 0}
    F = torch.nn.functional
    orig = F.leaky_relu

    def leaky_relu(x, negative_slope=0.01, inplace=False):
        key, where["n"] = (where["side"], where["n"]), where["n"] + 1
        if key not in flip:
            return orig(x, negative_slope, inplace)
        mask = torch.zeros_like(x, dtype=torch.bool)
        for ix in flip[key]:
            mask[tuple(ix)] = True
        swapped = x * torch.where(x < 0, torch.ones_like(x), torch.full_like(x, negative_slope))
        return torch.where(mask, swapped, orig(x, negative_slope, False))

    def forward(x, side):
        where.update(side=side, n=0)
        return d(x)[0]
    F.leaky_relu = leaky_relu
    try:
        r, g = forward(y, "real"), forward(yh, "fake")
        discriminator_loss([r], [g])[0].backward()
        grads = {n: t.grad.detach().numpy().copy() for n, t in d.named_parameters()}
        torch.optim.Adam(d.parameters(), h["learning_rate"], betas=[h["adam_b1"], h["adam_b2"]]).step()
        where["side"] = "gstep"
        with torch.no_grad():
            logits = forward(y, "gstep").numpy().copy(), forward(yh, "gstep").numpy().copy()
    finally:
        F.leaky_relu = orig
    return grads, logits


def sub_reruns(ticodec, out):
    """Step 3 of the module docstring, one process: -> ``runs/kink_sum.npz`` (per stored step-0 array, the sum
    over units of |Δ|) and ``runs/kink_base.json`` (max|Δ| of the unflipped reruns from the reference run)."""
    import torch
    from make_ticodec_variant_run import SEL_GRADS, _modules
    with open(os.path.join(out, "model.json")) as f:
        h = json.load(f)
    with open(os.path.join(out, "runs", "kink_units.json")) as f:
        found = json.load(f)
    ref = dict(np.load(os.path.join(out, "runs", "capture-ref.npz")))
    sd = torch.load(os.path.join(out, "do_00000000"), weights_only=True)
    y = torch.tensor(ref["s0.batch.y"])[:, None]
    yh = torch.tensor(ref["s0.gen.y_hat"])
    mods = _modules(ticodec, h)
    rows = [f"{p}.{n}" for p in ("msd", "mpd", "mstftd") for n, _ in mods[p].named_parameters()]
    lab = label(found["calls"])
    by = {}
    for u in found["units"]:
        side, layer = lab[u["call"]]
        by.setdefault((u["top"], u["sub"]), []).append(((side, layer), u["index"]))
    total = {k: np.zeros(np.shape(ref[k])) for k in ref if k.startswith(("u0.", "s0.")) and ".batch." not in k
             and not k.endswith((".codes", ".global_tokens"))}
    base_err = {}

    def run(fam, j, flip):
        for name in ("mpd", "msd", "mstftd"):
            mods[name].load_state_dict(sd[name])
            mods[name].zero_grad(set_to_none=True)
        grads, logits = sub_step(torch, mods, h, fam, j, y.clone(), yh.clone(), flip)
        arrays = {}
        for n, g in grads.items():
            full = f"{fam}.discriminators.{j}.{n}"
            arrays[("u0.d.grad_stats", rows.index(full))] = stats(g)
            if full in SEL_GRADS:
                arrays[f"u0.{full}.grad"] = g
        short = "stft" if fam == "mstftd" else fam
        arrays[f"s0.gstep.{short}.real_logits{j}"], arrays[f"s0.gstep.{short}.fake_logits{j}"] = logits
        return arrays
    for (fam, j), units in sorted(by.items()):
        base = run(fam, j, {})
        for k, v in base.items():
            want = ref[k[0]][k[1]] if isinstance(k, tuple) else ref[k]
            base_err[str(k)] = float(np.abs(np.asarray(v, np.float64) - want).max())
        for key, index in units:
            moved = run(fam, j, {key: [index]})
            for k, v in moved.items():
                dv = np.abs(np.asarray(v, np.float64) - base[k])
                if isinstance(k, tuple):
                    total[k[0]][k[1]] += dv
                else:
                    total[k] += dv
        print(f"{fam}[{j}]: {len(units)} units", flush=True)
    np.savez(os.path.join(out, "runs", "kink_sum.npz"), **total)
    with open(os.path.join(out, "runs", "kink_base.json"), "w") as f:
        json.dump(base_err, f)


def stats(g):
    x = np.asarray(g, np.float64)
    return np.array([x.sum(), np.abs(x).sum(), np.square(x).sum(), np.abs(x).max() if x.size else 0.0, x.size])


def kinks(ticodec, out):
    """Steps 1-3 of the module docstring; adds ``kink`` (per stored step-0 array), ``kink_units`` and
    ``kink_calls`` (tau per covered call) to ``reference/tolerance.json``."""
    me = [sys.executable, __file__, "--ticodec", ticodec, "--out", out]
    for mode in ("capture-ref", "capture-f64", "subs"):
        subprocess.run(me + ["--mode", mode], check=True)
    finish(out)


def finish(out):
    """The kink terms from the runs of ``kinks`` -> ``reference/tolerance.json``."""
    ref = dict(np.load(os.path.join(out, "reference", "reference.npz")))
    cap = dict(np.load(os.path.join(out, "runs", "capture-ref.npz")))
    same = [k for k in cap if k in ref and np.array_equal(cap[k], ref[k])]
    assert len(same) == len(cap), f"the observed run is not the reference: {sorted(set(cap) - set(same))[:5]}"
    with open(os.path.join(out, "runs", "kink_base.json")) as f:
        base = json.load(f)
    assert max(base.values()) == 0.0, f"a sub-discriminator alone is not the reference run: {base}"
    with open(os.path.join(out, "runs", "kink_units.json")) as f:
        found = json.load(f)
    total = dict(np.load(os.path.join(out, "runs", "kink_sum.npz")))
    kink = {}
    for k, t in total.items():
        cols = [(k, t, cap[k])]
        if k.endswith("grad_stats"):
            cols += [(f"{k}.col{c}", t[:, c], cap[k][:, c]) for c in range(4)]
        for name, t, r in cols:
            m = float(np.abs(np.asarray(r, np.float64)).max()) if np.size(r) else 0.0
            kink[name] = float(t.max() / m) if m > 0 else 0.0
    path = os.path.join(out, "reference", "tolerance.json")
    with open(path) as f:
        tol = json.load(f)
    lab = label(found["calls"])
    tol["kink"] = kink
    tol["kink_units"] = [dict({k: u[k] for k in ("top", "sub", "index", "x64", "x32", "scale", "tau")},
                              side=lab[u["call"]][0], layer=lab[u["call"]][1]) for u in found["units"]]
    taus = [c["tau"] for c in found["calls"]]
    tol["kink_calls"] = dict(covered=len(taus), tau_min=min(taus), tau_median=float(np.median(taus)),
                             tau_max=max(taus), elements=int(sum(c["size"] for c in found["calls"])),
                             tau_all_median=float(np.median([c["tau_all"] for c in found["calls"]])),
                             near_elements=int(sum(c["n_small"] for c in found["calls"])))
    with open(path, "w") as f:
        json.dump(tol, f, indent=0, sort_keys=True)


if __name__ == "__main__":
    import argparse
    sys.path.insert(0, HERE)
    ap = argparse.ArgumentParser()
    ap.add_argument("--ticodec", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=("capture-ref", "capture-f64", "subs"))
    a = ap.parse_args()
    if a.mode == "subs":
        sub_reruns(a.ticodec, a.out)
    elif a.mode:
        run(a.ticodec, a.out, a.mode)
    else:
        kinks(a.ticodec, a.out)
