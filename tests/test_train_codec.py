"""Stage 3.1 (TiCodec training) against the official training run of ``fixtures/ticodec-train``: step 0
before any update, the D and G updates, buffers, step 1 — with the fixture README's bounds (3 x the
official code's own fp64 / 1-thread spread). Every dimension comes from the fixture's model.json and
reference arrays; the folder is ``$VITA_JAX_TICODEC_TRAIN_FIXTURE`` (default ``<shared>/fixtures/ticodec-train``).
"""
import json
import os

import numpy as np
import pytest

from conftest import FIXTURES, rel_err

pytestmark = pytest.mark.slow  # minutes: outside the quick loop (pytest -m "not slow")

FIX = os.environ.get("VITA_JAX_TICODEC_TRAIN_FIXTURE", os.path.join(FIXTURES, "ticodec-train"))
REF = os.path.join(FIX, "reference")
assert os.path.isdir(REF), f"no ticodec-train fixture at {FIX} (set VITA_JAX_TICODEC_TRAIN_FIXTURE)"


def _npz(name):
    return dict(np.load(os.path.join(REF, name + ".npz")))


def stats(x):
    x = np.asarray(x, np.float64)
    return np.array([x.sum(), np.abs(x).sum(), np.square(x).sum(), np.abs(x).max() if x.size else 0.0, x.size])


def close(errs, name, got, ref, bound):
    e = rel_err(got, ref) if np.abs(np.asarray(ref, np.float64)).max() > 0 else float(np.abs(got).max())
    errs.append((e / bound, e, bound, name))


def check(errs):
    worst = max(errs)
    bad = [f"{n}: {e:.2e} > {b:.0e}" for r, e, b, n in errs if r > 1]
    assert not bad, "; ".join(bad[:12])
    return worst


@pytest.fixture(scope="module")
def run(big_memory):  # the debug step's program and both steps' intermediates: ~7 GB in this process
    """Both official steps, from g_00000000 / do_00000000, with every intermediate."""
    import jax
    import jax.numpy as jnp

    from vita_jax.train.codec import files as codec_files
    from vita_jax.train.codec import step as cs
    M, state, _ = codec_files.load_official(FIX, FIX + "/g_00000000", FIX + "/do_00000000")
    inp = _npz("inputs")
    step = jax.jit(cs.make_step(M, debug=True))
    before, out = [jax.device_get(state)], []
    for k in (0, 1):
        b = {n: jnp.asarray(inp[f"s{k}.batch.{n}"]) for n in ("y", "y_global", "y_mel")}
        state, met, aux = step(state, b, jnp.float32(M.cfg.learning_rate))
        out.append(jax.device_get((met, aux)))
        before.append(jax.device_get(state))
    return M, before, out


def test_official_steps(run):
    """Everything that needs the two official steps, as one test item: under ``pytest -n`` every xdist worker
    that runs a test of a module builds its module fixtures, and ``run`` (one compile of the debug step and
    both steps, ~4-5 min on 2 cores) then cost two setups when its tests were spread over two workers.
    (``--dist loadgroup`` with ``xdist_group`` would group them, but with pytest 9.2 and pytest-xdist 3.8 it
    groups nothing: xdist tags ``item._nodeid``, which pytest 9 no longer reads.) Every part runs and all
    failures are reported together."""
    parts = [("step 0 forward", _step0_forward), ("step 1 forward", _step1_forward),
             ("update 0", lambda r: _updates(r, 0)), ("update 1", lambda r: _updates(r, 1)),
             ("spectral norm", _spectral_norm), ("MSD[0].convs.0 gradient", _msd0_first_layer_gradient)]
    failed = []
    for name, part in parts:
        try:
            part(run)
        except AssertionError as e:
            failed.append(f"{name}: {e}")
    assert not failed, "\n".join(failed)


def _first(t):
    return np.asarray(t[0])


def forward_checks(errs, aux, met, s, f, k, pre, post):
    """Forward tensors / losses of step k vs ``s`` (step npz) and ``f`` (fmaps npz)."""
    g, gx = aux["g"], aux["gx"]
    enc = g["enc"]
    codes_ok = np.array_equal(np.asarray(g["codes"]), s["vq.codes"]) and \
        np.array_equal(np.asarray(g["tokens"]), s["vq.global_tokens"])
    assert codes_ok, f"step {k}: VQ codes / global tokens differ"
    mine = {"enc.c": g["c"], "enc.g1": g["g1"], "enc.g2": g["g2"], "vq.local0.in": g["c"], "vq.q": g["q"],
            "vq.g_q": g["g_q"], "gen.y_hat": aux["y_hat"], "mel.y_hat_mel_main": gx["mel_main"],
            "enc.gte_linear1": enc["GlobalTokenEncoder"]["linear"][0],
            "enc.gte_linear2": enc["GlobalTokenEncoder"]["linear"][1],
            "enc.gte_prebn1": enc["GlobalTokenEncoder"]["prebn"][0],
            "enc.gte_prebn2": enc["GlobalTokenEncoder"]["prebn"][1],
            "enc.conv_pre_out1_stats": stats(_first(enc["conv_pre_out1"])),
            "enc.conv_pre_out2_stats": stats(_first(enc["conv_pre_out2"])),
            "gen.conv_pre_out": _first(g["gen"]["conv_pre_out"]),
            "gen.conv_post_in_stats": stats(_first(g["gen"]["conv_post_in"]))}
    for i in range(len([n for n in s if n.startswith("gen.ups") and n.endswith("_out_stats")])):
        mine[f"gen.ups{i}_out_stats"] = stats(_first(g["gen"][f"ups{i}_out"]))
    for n in (512, 256, 128):
        mine[f"mel.y_mel_{n}"], mine[f"mel.y_hat_mel_{n}"] = aux["mel_r"][n], gx["mel_g"][n]
    for fam in ("mpd", "msd", "stft"):
        for i, (r, gen_) in enumerate(zip(aux["dout"][fam][0], aux["dout"][fam][1])):
            mine[f"dstep.{fam}.real_logits{i}"], mine[f"dstep.{fam}.fake_logits{i}"] = r, gen_
        mine[f"dstep.{fam}.lsgan_real"], mine[f"dstep.{fam}.lsgan_fake"] = aux["dterms"][fam][1], aux["dterms"][fam][2]
        mine[f"dstep.{fam}.loss_disc"] = aux["dterms"][fam][0]
    for name, v in mine.items():
        assert np.shape(v) == s[name].shape, f"{name}: shape {np.shape(v)} vs {s[name].shape}"
        close(errs, f"s{k}.{name}", v, s[name], pre[0])
    losses = {"vq.local0.loss": g["local_loss"], "vq.global.loss": g["global_loss"], "vq.loss_q": met["loss_quantizer"],
              "loss.loss_mel1": met["loss_mel1"], "loss.loss_mel2": met["loss_mel2"],
              "loss.loss_mel3": met["loss_mel3"],
              "loss.l1_mel_main": gx["l1_main"], "loss.mel_error": met["mel_spec_error"], "loss.cos_sim": g["cos"],
              "scalar.loss_mel": met["loss_mel"], "scalar.loss_quantizer": met["loss_quantizer"],
              "scalar.mel_spec_error": met["mel_spec_error"], "scalar.compare_loss": met["compare_loss"],
              "scalar.disc_loss_total": met["disc_loss_total"]}
    for name, v in losses.items():
        close(errs, f"s{k}.{name}", v, s[name], pre[1])
    # after the D update: G-step discriminator outputs, adversarial / feature-matching terms, the total
    post_vals = {"scalar.gen_loss_total": met["gen_loss_total"]}
    for fam in ("mpd", "msd", "stft"):
        for i, (r, gen_) in enumerate(zip(gx["out"][fam][0], gx["out"][fam][1])):
            post_vals[f"gstep.{fam}.real_logits{i}"], post_vals[f"gstep.{fam}.fake_logits{i}"] = r, gen_
        post_vals[f"gstep.{fam}.adv_terms"], post_vals[f"gstep.{fam}.loss_gen"] = gx["adv"][fam][1], gx["adv"][fam][0]
        post_vals[f"gstep.{fam}.loss_fm"] = gx["fm"][fam][0]
        post_vals[f"gstep.{fam}.fm_layer_mean_abs_f64"] = gx["fm"][fam][1]
    for name, v in post_vals.items():
        close(errs, f"s{k}.{name}", v, s[name], post)
    fmap_checks(errs, aux, f, k)  # MSD[0]'s σ: _spectral_norm


FMAP_BOUNDS = {0: {"dstep": 6e-6, "gstep": 5e-4}, 1: {"dstep": 3e-4, "gstep": 3e-4}}


def fmap_checks(errs, aux, f, k):
    phases = {"dstep": aux["dout"], "gstep": aux["gx"]["out"]}
    for phase, out in phases.items():
        bound = FMAP_BOUNDS[k][phase]
        for fam in ("mpd", "msd", "stft"):
            for side, j in (("real", 2), ("fake", 3)):
                fm = out[fam][j]
                pre = f"{phase}.{fam}.{side}"
                st = np.array([[stats(layer) for layer in sub] for sub in fm])
                shp = np.array([[list(np.shape(layer)) + [0] * (4 - np.ndim(layer)) for layer in sub] for sub in fm])
                assert np.array_equal(shp, f[pre + ".fmap_shapes"]), pre
                close(errs, f"f{k}.{pre}.fmap_stats", st, f[pre + ".fmap_stats"], bound)
                if pre + ".fmap_probe_idx" in f:
                    idx = f[pre + ".fmap_probe_idx"]
                    val = np.array([[np.asarray(layer).ravel()[idx[a, b]] for b, layer in enumerate(sub)]
                                    for a, sub in enumerate(fm)])
                    close(errs, f"f{k}.{pre}.fmap_probe_val", val, f[pre + ".fmap_probe_val"], bound)
                for name in [n for n in f if n.startswith(pre + ".anchor")]:
                    a, layer = name[len(pre) + 7:].split(".layer")
                    close(errs, f"f{k}.{name}", np.asarray(fm[int(a)][int(layer)])[0], f[name], bound)
    for n in (1, 2):
        close(errs, f"f{k}.enc.mid{n}_stats", stats(_first(aux["g"]["enc"][f"mid{n}"])), f[f"enc.mid{n}_stats"],
              FMAP_BOUNDS[k]["dstep"])


def test_mel_front_end_and_batches():
    """Mel filterbanks / windows as meldataset builds them; the dataset's mels of the stored crops."""
    import jax.numpy as jnp

    from vita_jax.models import discriminators
    from vita_jax.models.ticodec import CodecTrainConfig
    from vita_jax.train.codec import losses as codec_losses
    cfg = CodecTrainConfig.from_model_json(os.path.join(FIX, "model.json"))
    mb = _npz("mel_basis")
    sr = cfg.sampling_rate
    cases = {"main_fmax_for_loss": (cfg.n_fft, cfg.fmax_for_loss), "main_fmax": (cfg.n_fft, cfg.fmax),
             "512": (512, cfg.fmax_for_loss), "256": (256, cfg.fmax_for_loss), "128": (128, cfg.fmax_for_loss)}
    for name, (n_fft, fmax) in cases.items():
        got = codec_losses.mel_filters(sr, n_fft, cfg.num_mels, cfg.fmin, fmax)
        assert np.abs(got - mb[f"mel_basis.{name}"]).max() <= 1e-6 * np.abs(mb[f"mel_basis.{name}"]).max(), name
        # float32 as torch computes it; torch's vectorised cos may round the last bit differently
        assert np.abs(discriminators.hann_window(n_fft) - mb[f"hann_window.{name}"]).max() <= 1.2e-7, name
    inp = _npz("inputs")
    errs = []
    for k in (0, 1):
        y = jnp.asarray(inp[f"s{k}.batch.y"])
        args = (cfg.n_fft, cfg.num_mels, sr, cfg.hop_size, cfg.win_size, cfg.fmin)
        close(errs, f"s{k}.y_mel", codec_losses.mel_spectrogram(y, *args, cfg.fmax_for_loss),
              inp[f"s{k}.batch.y_mel"], 4e-5)
        close(errs, f"s{k}.x_mel", codec_losses.mel_spectrogram(y, *args, cfg.fmax), inp[f"s{k}.batch.x_mel"], 4e-5)
    print("worst mel", check(errs))


def _step0_forward(run):
    _, _, out = run
    errs = []
    met, aux = out[0]
    forward_checks(errs, aux, met, _npz("step0"), _npz("fmaps0"), 0, (5e-5, 5e-5), 5e-4)
    print("worst step0", check(errs))


def _step1_forward(run):
    _, _, out = run
    errs = []
    met, aux = out[1]
    forward_checks(errs, aux, met, _npz("step1"), _npz("fmaps1"), 1, (8e-2, 6e-3), 6e-3)
    print("worst step1", check(errs))


def _updates(run, k):
    """Gradients, Adam moments and parameters after both updates of step k; buffers after the step."""
    from vita_jax.convert import ticodec_ckpt as io
    M, before, out = run
    _, aux = out[k]
    u = _npz(f"update{k}")
    with open(os.path.join(REF, "optimizer_params.json")) as fh:
        names = json.load(fh)
    b_stats, b_sel, b_buf = ((8e-4, 3e-2, 5e-5), (2e-3, 3e-1, 7e-4))[k]
    lr = float(M.cfg.learning_rate)
    errs = []
    for opt, side, parts, grad in (("opt_g", "g", io.G_PARTS, aux["ggrad"]),
                                   ("opt_d", "d", io.D_OPT_ORDER, aux["dgrad"])):
        p0, p1 = before[k][side + "p"], before[k + 1][side + "p"]
        adam = before[k + 1][side + "opt"]
        order = io.param_order(p0, parts)
        assert [(n["module"], n["name"]) for n in names["optim_" + side]] == order
        fl = {key: {p: io.flat(t[p]) for p in parts} for key, t in
              (("g", grad), ("p0", p0), ("p1", p1), ("m", adam.mu), ("v", adam.nu))}
        has = np.array([not (p == "encoder" and n.startswith("linear.0.")) for p, n in order])
        assert np.array_equal(has, u[opt + ".has_grad"])
        rows = {"grad_stats": [], "param_after_stats": [], "update_stats": [], "exp_avg_stats": [],
                "exp_avg_sq_stats": []}
        for p, n in order:
            g, a, b = (np.asarray(fl[x][p][n]) for x in ("g", "p1", "p0"))
            d = (a - b).astype(np.float64)
            rows["grad_stats"].append(stats(g) * (not (p == "encoder" and n.startswith("linear.0."))))
            rows["param_after_stats"].append(stats(a))
            rows["update_stats"].append([d.sum(), np.abs(d).sum(), np.abs(d).max(), np.count_nonzero(d)])
            rows["exp_avg_stats"].append(stats(fl["m"][p][n])[:3])
            rows["exp_avg_sq_stats"].append(stats(fl["v"][p][n])[:3])
            sel = f"sel.{p}.{n}"
            if sel + ".after" in u and k == 0:  # step 1 starts from parameters that already differ by <= 2·lr
                _after_rule(sel, a, u[sel + ".after"], lr, n.endswith("GlobalTokenEncoder.fn.0.bias"))
                close(errs, f"u{k}.{sel}.after", a, u[sel + ".after"], b_sel)
                for x, key in (("g", "grad"), ("m", "exp_avg"), ("v", "exp_avg_sq")):
                    if f"{sel}.{key}" in u:
                        close(errs, f"u{k}.{sel}.{key}", fl[x][p][n], u[f"{sel}.{key}"], b_sel)
        for name, r in rows.items():  # rows without a gradient are all zeros in the reference too
            ref, got = u[f"{opt}.{name}"], np.array(r)
            if k == 0:  # each statistic against its own largest row (stricter than the README's per array)
                for col in range(ref.shape[1]):
                    if name == "update_stats" and col == 0:
                        errs.append(_net_flips(f"u{k}.{opt}.{name}[:, 0]", got[:, 0], ref[:, 0], lr, side))
                    else:
                        close(errs, f"u{k}.{opt}.{name}[:, {col}]", got[:, col], ref[:, col], b_stats)
            else:  # the README's definition: per array, against its largest magnitude
                close(errs, f"u{k}.{opt}.{name}", got, ref, b_stats)
        assert np.all(u[opt + ".adam_step"][has] == k + 1) and int(adam.count) == k + 1
    _buffer_checks(errs, u, before[k + 1], b_buf)  # BatchNorm; MSD[0]'s u / v: _spectral_norm
    print(f"worst update{k}", check(errs))


# README §8: "stepK: spectral-norm sigma per call", "updateK: buffers"
SIGMA_BOUNDS, SN_BUFFER_BOUNDS = (4e-7, 7e-7), (5e-5, 7e-4)


def _sn_replay(u, weights):
    """Our spectral norm (:func:`discriminators.power_iteration`, σ = u · (W v)) over a sequence of calls, one
    weight per call -> (σ per call, u, v after the last call)."""
    import jax.numpy as jnp

    from vita_jax.models.discriminators import power_iteration
    u, sig = jnp.asarray(u), []
    for w in weights:
        wm = jnp.asarray(w).reshape(w.shape[0], -1)
        u, v = power_iteration(wm, u)
        sig.append(jnp.dot(u, wm @ v))
    return np.array(sig), np.asarray(u), np.asarray(v)


def _spectral_norm(run):
    """MSD[0]'s spectral norm within the README's bounds: σ of every conv at the 4 calls of each step (D real,
    D fake, G real, G fake: 4e-7 at step 0, 7e-7 at step 1, against the step's largest σ; the README's
    "spectral-norm sigma per call" rows are measured over all 4 calls, G-update calls included) and the
    power-iteration vectors u, v after each step (5e-5 / 7e-4).

    The G calls and step 1 use weights that Adam's first, sign-like step has moved by ±lr per element. An
    element whose gradient is within float32 noise of 0 may get the other sign than upstream and move 2·lr
    the other way (README §8; allowed by the update rule of _updates); σ of its layer then moves by about
    |u_i v_j|·2·lr, a case the σ rows do not cover (the official reruns had no such element in MSD[0]). So
    for each layer whose updated weights the fixture stores whole (``sel.msd.discriminators.0.<layer>
    .weight_orig.after``: convs.0 and conv_post) our power iteration is also replayed on the official weights
    (checkpoint, after update 0, after update 1) from the checkpoint's u and checked against the official σ
    and u, v: always. Only if our updated layer carries such an element (|Δ| > 1e-6 from the official tensor
    after update 0) does that replay stand in for our own σ after the update and for our u, v. Every other
    layer is compared directly, whatever happens."""
    from vita_jax.convert import ticodec_ckpt as io
    _, before, out = run
    s, u = [_npz("step0"), _npz("step1")], [_npz("update0"), _npz("update1")]
    sig = [np.array(out[k][1]["sigma"]) for k in (0, 1)]            # [calls, layers]
    assert sig[0].shape == s[0]["sn.sigma"].shape
    layers = [f"convs.{j}" for j in range(sig[0].shape[1] - 1)] + ["conv_post"]
    w_ck, b_ck = io.flat(before[0]["dp"]["msd"]), io.flat(before[0]["db"]["msd"])
    ours_after0 = io.flat(before[1]["dp"]["msd"])
    bufs = [dict(io.flat(before[k + 1]["db"]["msd"])) for k in (0, 1)]
    errs, replaced = [], []
    for j, layer in enumerate(layers):
        p = f"discriminators.0.{layer}"
        after = [u[k].get(f"sel.msd.{p}.weight_orig.after") for k in (0, 1)]
        if after[0] is None or after[1] is None:
            continue
        w0 = np.asarray(w_ck[p + ".weight_orig"])
        r0 = _sn_replay(b_ck[p + ".weight_u"], [w0, w0, after[0], after[0]])
        r1 = _sn_replay(r0[1], [after[0], after[0], after[1], after[1]])
        for k, (rs, ru, rv) in enumerate((r0, r1)):
            ref = s[k]["sn.sigma"]
            errs.append(_rel(f"replay s{k}.sn.sigma[:, {j}]", rs, ref[:, j], np.abs(ref).max(), SIGMA_BOUNDS[k]))
            for x, val in (("u", ru), ("v", rv)):
                close(errs, f"replay u{k}.buf.msd.{p}.weight_{x}", val, u[k][f"buf.msd.{p}.weight_{x}"],
                      SN_BUFFER_BOUNDS[k])
        if np.abs(np.asarray(ours_after0[p + ".weight_orig"], np.float64) - after[0]).max() > 1e-6:
            replaced.append(layer)
            sig[0][2:, j], sig[1][:, j] = r0[0][2:], r1[0]
            for k, (_, ru, rv) in enumerate((r0, r1)):
                bufs[k][p + ".weight_u"], bufs[k][p + ".weight_v"] = ru, rv
    for k in (0, 1):
        ref = s[k]["sn.sigma"]
        errs.append(_rel(f"s{k}.sn.sigma", sig[k], ref, np.abs(ref).max(), SIGMA_BOUNDS[k]))
        for name in [n for n in u[k] if n.startswith("buf.msd.")]:
            close(errs, f"u{k}.{name}", bufs[k][name[len("buf.msd."):]], u[k][name], SN_BUFFER_BOUNDS[k])
    print("layers replayed on the official weights (a flipped first step):", replaced or "none")
    print("worst spectral norm", check(errs))


def _rel(name, got, ref, scale, bound):
    e = float(np.abs(np.asarray(got, np.float64) - ref).max() / scale)
    return (e / bound, e, bound, name)


def _msd0_first_layer_gradient(run):
    """The D-update gradient of MSD[0].convs.0 (spectral-normed, on the raw waveform) against the fixture's
    full tensor, within 3x the official code's own spread on this very array (float64 and 1-thread reruns in
    ``tolerance.json``: the README's rule for a bound): its smallest element (|g| = 1.0e-7, 1.3e-4 of the
    largest, here) then has the official sign, so Adam's sign-like first step moves every element the
    official way. Measured: max 1.6e-5, L2 4.0e-6 (fed the official ŷ instead of ours: 5.3e-7 / 4.9e-7),
    official spread 7.1e-6 (float64) / 2.4e-5 (1 thread)."""
    from vita_jax.convert import ticodec_ckpt as io
    _, _, out = run
    key = "msd.discriminators.0.convs.0.weight_orig"
    ref = _npz("update0")[f"sel.{key}.grad"]
    got = np.asarray(io.flat(out[0][1]["dgrad"]["msd"])[key[4:]], np.float64)
    with open(os.path.join(REF, "tolerance.json")) as fh:
        tol = json.load(fh)
    spread = max(tol[t][f"update0.sel.{key}.grad"]["rel_to_absmax"]
                 for t in ("float64_vs_fp32_reference", "fp32_1_thread_vs_reference"))
    bound = float(f"{3 * spread:.0e}")
    err, l2 = rel_err(got, ref), float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    flips = int(np.sum(np.sign(got) != np.sign(ref)))
    print(f"{key} grad: max {err:.2e} (bound {bound:.0e}), L2 {l2:.2e}, sign flips {flips}, "
          f"smallest |g| {np.abs(ref).min():.2e}")
    assert err <= bound, f"{key} grad: {err:.2e} > {bound:.0e} (L2 {l2:.2e}, {flips} sign flips)"


def _net_flips(name, got, ref, lr, side):
    """Σ Δ per parameter after Adam's first, sign-like step (±lr per element) counts the elements moved the other
    way than upstream: Σ_rows |ΣΔ − ΣΔ_ref| / (2·lr) is at least that count minus cancellations. The README's
    rule (§8: all but a few times the official count of elements off by more than lr/2, float64 and 1-thread
    reruns, ``tolerance.json``) bounds it by 3x that count. (Against its largest row, as the other columns, this
    column fails the official code itself: its float64 and 1-thread reruns both differ from the reference by
    1.15e-3 > 8e-4, 88 net elements of ``mpd.discriminators.0.convs.3.weight_v`` — and we by 1.15e-3 there.)"""
    with open(os.path.join(REF, "tolerance.json")) as fh:
        up = json.load(fh)["updated_parameters"]
    allowed = 3 * max(up[f"step0.{side}.{t}"]["n_over_half_lr"] for t in ("fp64_vs_fp32", "fp32_1thread_vs_fp32"))
    n = float(np.abs(np.asarray(got, np.float64) - ref).sum() / (2 * lr))
    print(f"{name}: {n:.1f} net elements moved the other way (allowed {allowed})")
    return (n / allowed, n, allowed, name + " (net sign flips)")


def _after_rule(name, got, ref, lr, kink_bias):
    """Sign-like first Adam step: every element within 2·lr + 1e-6, all but a small fraction within 1e-6
    (``GlobalTokenEncoder.fn.0.bias``: its true gradient is 0 where BatchNorm removes it, README §8)."""
    d = np.abs(np.asarray(got, np.float64) - ref)
    assert d.max() <= 2 * lr + 1e-6, f"{name}: max |Δ| {d.max():.2e}"
    if not kink_bias:
        frac = np.mean(d > 1e-6)
        assert frac <= 0.02, f"{name}: {frac:.3%} elements off by more than 1e-6"


def _buffer_checks(errs, u, state, bound):
    """Buffers after the step but MSD[0]'s spectral-norm vectors (_spectral_norm)."""
    from vita_jax.convert import ticodec_ckpt as io
    bufs = {"encoder": io.flat(state["gb"]["encoder"])}
    for name in [n for n in u if n.startswith("buf.") and not n.startswith("buf.msd")]:
        part, key = name[4:].split(".", 1)
        got = np.asarray(bufs[part][key])
        if key.endswith("num_batches_tracked"):
            assert int(got) == int(u[name]), name
        else:
            close(errs, name, got, u[name], bound)


def test_official_files_roundtrip(tmp_path):
    """g_ / do_ -> vita_jax -> g_ / do_ is bitwise for every tensor (and order, _metadata, param
    groups); Adam moments written after steps come back bitwise and load into torch's Adam."""
    import torch

    from vita_jax.convert import ticodec_ckpt as io
    from vita_jax.train.codec import files as codec_files
    M, state, info = codec_files.load_official(FIX, FIX + "/g_00000000", FIX + "/do_00000000")
    assert (info["steps"], info["epoch"], int(state["step"])) == (-1, -1, 0)
    # moments from the parameters themselves (distinct values per element, no extra memory for random draws)
    state["gopt"] = state["gopt"]._replace(count=np.int32(3), mu=state["gp"], nu=jax_abs(state["gp"]))
    state["dopt"] = state["dopt"]._replace(count=np.int32(3), mu=state["dp"], nu=jax_abs(state["dp"]))
    state["step"] = np.int32(3)
    gpath, dpath = codec_files.save_official(str(tmp_path), M, state, epoch=0, info=info)
    assert os.path.basename(gpath) == "g_00000002"
    for orig, new in ((FIX + "/g_00000000", gpath), (FIX + "/do_00000000", dpath)):
        a, b = torch.load(orig, weights_only=True), torch.load(new, weights_only=True)
        assert list(a) == list(b)
        for part in [p for p in a if isinstance(a[p], dict) and p not in ("optim_g", "optim_d")]:
            assert list(a[part]) == list(b[part]), part
            assert a[part]._metadata == b[part]._metadata, part
            for key, t in a[part].items():
                assert t.dtype == b[part][key].dtype and torch.equal(t, b[part][key]), f"{part}.{key}"
    d = torch.load(dpath, weights_only=True)
    a = torch.load(FIX + "/do_00000000", weights_only=True)
    for opt in ("optim_g", "optim_d"):
        ga, gb = dict(a[opt]["param_groups"][0]), dict(d[opt]["param_groups"][0])
        assert ga == gb, opt
        n = len(ga["params"])
        expect = n - 2 if opt == "optim_g" else n  # encoder.linear.0.{weight,bias} never get a gradient
        assert len(d[opt]["state"]) == expect and float(d[opt]["state"][0]["step"]) == 3.0
        torch.optim.Adam([torch.zeros(0) for _ in range(n)], lr=1.0).load_state_dict(d[opt])
    assert (d["steps"], d["epoch"]) == (2, 0)
    _, back, _ = codec_files.load_official(FIX, gpath, dpath)
    assert int(back["step"]) == 3 and int(back["gopt"].count) == 3
    for side in ("g", "d"):
        for t in ("mu", "nu"):
            got = io.flat(getattr(back[side + "opt"], t))
            for key, want in io.flat(getattr(state[side + "opt"], t)).items():
                if side == "g" and key.startswith("encoder.linear.0."):
                    continue  # no Adam state upstream: zeros on reading
                assert np.array_equal(np.asarray(got[key]), np.asarray(want)), (side, t, key)


def jax_abs(tree):
    import jax
    return jax.tree.map(lambda x: np.abs(np.asarray(x)), tree)


def test_data_crops_as_official():
    """File order, random draws and crops of both batches, as MelDataset with random.seed(1234)."""
    from vita_jax.models.ticodec import CodecTrainConfig
    from vita_jax.train.codec.data import CodecData, read_file_list
    cfg = CodecTrainConfig.from_model_json(os.path.join(FIX, "model.json"))
    data = CodecData(read_file_list(os.path.join(FIX, "train.lst")), cfg.segment_size, cfg.batch_size,
                     cfg.sampling_rate)
    inp = _npz("inputs")
    for k in range(data.steps_per_epoch):
        data.draws = []
        b = next(data)
        names = [os.path.relpath(f, FIX) for f in data.files[k * cfg.batch_size:(k + 1) * cfg.batch_size]]
        assert names == [str(x) for x in inp[f"s{k}.batch.files"]]
        assert np.array_equal(np.array(data.draws), inp[f"s{k}.rand_draws"])
        assert (np.array_equal(b["y"], inp[f"s{k}.batch.y"])
                and np.array_equal(b["y_global"], inp[f"s{k}.batch.y_global"]))


def test_leaky_relu_as_torch():
    """``codec_layers.leaky_relu`` (TiCodec and its discriminators) is ``F.leaky_relu`` in value and gradient,
    also at exactly 0 (torch: ``x > 0 ? g : g·slope``; ``jax.nn.leaky_relu``'s gradient there is 1)."""
    import jax
    import jax.numpy as jnp
    import torch

    from vita_jax.models.codec_layers import leaky_relu
    x = np.array([-2.5, -1e-30, -0.0, 0.0, 1e-30, 3.0], np.float32)
    for slope in (0.1, 0.2, 0.01):
        t = torch.tensor(x, requires_grad=True)
        out = torch.nn.functional.leaky_relu(t, slope)
        out.backward(torch.ones_like(t))
        grad = jax.grad(lambda v: leaky_relu(v, slope).sum())(jnp.asarray(x))
        assert np.array_equal(np.asarray(leaky_relu(jnp.asarray(x), slope)), out.detach().numpy())
        assert np.array_equal(np.asarray(grad), t.grad.numpy()), (slope, grad, t.grad)
        assert float(grad[3]) == np.float32(slope)
