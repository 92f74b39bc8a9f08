"""The official side of ``make_ticodec_variant.py``: initial checkpoint, one observed run of upstream
``train.main()`` (reference, float64 or 1 thread) and the spread of the reruns. Observers only pass calls on."""
import json
import os
import sys

import numpy as np
from make_ticodec_variant import Recorder, shims

# where the official code is now (read by make_ticodec_variant_kinks.py's leaky_relu hook): the step, the top
# module (``generator``, ``mpd``, ...), its call number within the step, the sub-discriminator last entered
CTX = {"step": 0, "top": None, "call": 0, "sub": None}
SEL_GRADS = ("msd.discriminators.0.convs.0.weight_orig", "msd.discriminators.0.convs.0.bias",
             "mpd.discriminators.0.convs.0.weight_v", "generator.conv_post.weight_v", "encoder.conv_pre.weight_v")


def _modules(ticodec, h):
    shims(ticodec)
    from academicodec.models.encodec.msstftd import MultiScaleSTFTDiscriminator
    from academicodec.models.ticodec import models as m
    from academicodec.models.ticodec.env import AttrDict
    h = AttrDict(h)
    return dict(generator=m.Generator(h), encoder=m.Encoder(h), quantizer=m.Quantizer(h),
                mpd=m.MultiPeriodDiscriminator(), msd=m.MultiScaleDiscriminator(),
                mstftd=MultiScaleSTFTDiscriminator(32))


def init_checkpoint(ticodec, out, h, nbuf):
    """g_00000000 / do_00000000 as upstream's save_checkpoint writes them (steps = epoch = -1: a fresh start)."""
    import torch
    torch.manual_seed(h["seed"])
    mods = _modules(ticodec, h)
    import soundfile as sf
    from academicodec.utils import save_checkpoint
    for part in ("g", "d"):
        buf = torch.randn(nbuf) / np.sqrt(1536.0)
        off = 0
        names = ("generator", "encoder") if part == "g" else ("mpd", "msd", "mstftd")
        for n in names:
            for key, p in mods[n].named_parameters():
                if p.numel() < 4096:
                    continue
                rows, per = p.shape[0], p[0].numel()
                stride = per if per * rows <= nbuf else max(1, (nbuf - per) // max(1, rows - 1))
                start = off % max(1, nbuf - (rows - 1) * stride - per)
                p.data = buf.as_strided(p.shape, (stride,) + tuple(p[0].stride()), start)
                off += 7919
    with torch.no_grad():
        y = torch.tensor(sf.read(os.path.join(out, "wavs", "clip0.wav"), dtype="float32")[0][:h["segment_size"]])
        c, g1 = mods["encoder"](y[None, None].repeat(2, 1, 1))
        for j, mod in enumerate(mods["quantizer"].quantizer_modules):
            mod.embedding.weight.normal_(0, float(c.std()))
        for mod in mods["quantizer"].quantizer_modules_globaltokens:
            mod.embedding.weight.normal_(0, float(g1.std()) + 1e-3)
    adam = lambda ps: torch.optim.Adam(ps, h["learning_rate"], betas=[h["adam_b1"], h["adam_b2"]])  # noqa: E731
    optim_g = adam(list(mods["generator"].parameters()) + list(mods["encoder"].parameters())
                   + list(mods["quantizer"].parameters()))
    optim_d = adam(list(mods["msd"].parameters()) + list(mods["mpd"].parameters()) + list(mods["mstftd"].parameters()))
    for o in (optim_g, optim_d):
        torch.optim.lr_scheduler.ExponentialLR(o, gamma=h["lr_decay"], last_epoch=-1)
    save_checkpoint(os.path.join(out, "g_00000000"), {n: mods[n].state_dict() for n in ("generator", "encoder",
                                                                                      "quantizer")})
    save_checkpoint(os.path.join(out, "do_00000000"), dict(
        mpd=mods["mpd"].state_dict(), msd=mods["msd"].state_dict(), mstftd=mods["mstftd"].state_dict(),
        optim_g=optim_g.state_dict(), optim_d=optim_d.state_dict(), steps=-1, epoch=-1))


def _stats(t):
    x = t.detach().double().numpy()
    return np.array([x.sum(), np.abs(x).sum(), np.square(x).sum(), np.abs(x).max() if x.size else 0.0, x.size])


class Stop(Exception):
    """Raised by the data loader when the steps asked for are done."""


def run_official(ticodec, out, run, lrelu=None, steps=2, save=None):
    """Upstream ``train.main()`` for one epoch (2 steps) from ``out``'s files, observed; -> runs/<run>.npz
    (``save``: another file). ``lrelu(original)`` -> a stand-in for ``torch.nn.functional.leaky_relu`` (the
    official modules look it up at each call; it reads ``CTX``); ``steps``: stop before step ``steps``."""
    import torch
    if lrelu is not None:
        torch.nn.functional.leaky_relu = lrelu(torch.nn.functional.leaky_relu)
    if run == "thread1":
        torch.set_num_threads(1)
    if run == "f64":
        torch.set_default_dtype(torch.float64)
    shims(ticodec)
    import academicodec.models.ticodec.train as T
    import librosa
    from academicodec.models.ticodec import meldataset as md
    md.librosa_mel_fn = lambda sr, n_fft, n_mels, fmin, fmax: librosa.filters.mel(
        sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    rec, calls = {}, {"step": 0}
    mods = {}

    def observed(cls, name):
        class Obs(cls):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                mods[name] = self
                self.calls = []
                for j, d in enumerate(getattr(self, "discriminators", ())):
                    d.register_forward_pre_hook(lambda *_, j=j: CTX.update(sub=j))

            def forward(self, *a, **k):
                CTX.update(top=name, call=len(self.calls), sub=None)
                o = super().forward(*a, **k)
                CTX["top"] = None
                self.calls.append(o)
                return o
        return Obs

    for name, attr in (("generator", "Generator"), ("encoder", "Encoder"), ("quantizer", "Quantizer"),
                       ("mpd", "MultiPeriodDiscriminator"), ("msd", "MultiScaleDiscriminator"),
                       ("mstftd", "MultiScaleSTFTDiscriminator")):
        setattr(T, attr, observed(getattr(T, attr), name))
    T.torch = types_proxy(torch)
    if run == "f64":  # the dataset and mel front-end stay float32 (FloatTensor, .float() filterbank): cast at entry
        def mel(y, *a, **k):
            torch.set_default_dtype(torch.float32)
            try:
                return md_mel(y.float(), *a, **k).to(torch.float64)
            finally:
                torch.set_default_dtype(torch.float64)
        md_mel = md.mel_spectrogram
        T.mel_spectrogram = md.mel_spectrogram = mel
    loader = T.DataLoader

    class Loader(loader):
        def __iter__(self):
            for b in super().__iter__():
                k = calls["step"]
                if k >= steps:
                    raise Stop
                x, y, files, y_mel, yg = b
                rec.update({f"s{k}.batch.y": y.numpy(), f"s{k}.batch.y_global": yg.numpy(),
                            f"s{k}.batch.y_mel": y_mel.numpy()})
                dt = torch.get_default_dtype()
                yield x.to(dt), y.to(dt), files, y_mel.to(dt), yg.to(dt)
    T.DataLoader = Loader
    names = {}

    def pre(opt, args, kwargs):
        side = "d" if opt.param_groups[0]["params"][0] is next(mods["msd"].parameters()) else "g"
        if not names:
            for s, parts in (("d", ("msd", "mpd", "mstftd")), ("g", ("generator", "encoder", "quantizer"))):
                names[s] = [(f"{p}.{n}", t) for p in parts for n, t in mods[p].named_parameters()]
        k = calls["step"]
        rec[f"u{k}.{side}.grad_stats"] = np.array([_stats(t.grad) if t.grad is not None else np.zeros(5)
                                                    for _, t in names[side]])
        for n, t in names[side]:
            if n in SEL_GRADS:
                rec[f"u{k}.{n}.grad"] = t.grad.detach().numpy().copy()

    def post(opt, args, kwargs):
        if opt.param_groups[0]["params"][0] is next(mods["msd"].parameters()):
            return
        k = calls["step"]
        _step_record(rec, mods, k)
        bn = mods["encoder"].GlobalTokenEncoder.fn[2]
        rec[f"u{k}.bn.running_mean"], rec[f"u{k}.bn.running_var"] = bn.running_mean.numpy().copy(), \
            bn.running_var.numpy().copy()
        for m in mods.values():
            m.calls = []
        calls["step"] += 1
        CTX["step"] = calls["step"]
    from torch.optim import optimizer as opt_mod
    opt_mod.register_optimizer_step_pre_hook(pre)
    opt_mod.register_optimizer_step_post_hook(post)
    ck = os.path.join(out, "runs", run)
    os.makedirs(ck, exist_ok=True)
    for f in ("g_00000000", "do_00000000"):
        src, dst = os.path.join(out, f), os.path.join(ck, f)
        if not os.path.exists(dst):
            os.symlink(os.path.abspath(src), dst)
    lst = os.path.join(ck, "train.lst")
    with open(os.path.join(out, "train.lst")) as f:
        open(lst, "w").write("".join(os.path.join(os.path.abspath(out), ln) for ln in f))
    sys.argv = ["train.py", "--config", os.path.join(out, "model.json"), "--checkpoint_path", ck,
                "--input_training_file", lst, "--input_validation_file", lst, "--training_epochs", "1",
                "--stdout_interval", "1", "--summary_interval", "1", "--checkpoint_interval", "100000000",
                "--validation_interval", "100000000"]
    try:
        T.main()
    except Stop:
        pass
    for key, v in Recorder.scalars.items():
        name, step = key.split("@")
        rec[f"s{step}.scalar.{name.split('/')[-1]}"] = np.float64(v)
    np.savez(save or os.path.join(out, "runs", run + ".npz"), **{k: np.asarray(v) for k, v in rec.items()})


def _step_record(rec, mods, k):
    """Forward values of step k from the modules' calls (D update: mpd/msd call 0, mstftd calls 0-1)."""
    num = lambda t: t.detach().numpy().copy()  # noqa: E731
    c, g1, g2 = mods["encoder"].calls[0]
    q, loss_q, codes, gq, toks = mods["quantizer"].calls[0]
    rec.update({f"s{k}.enc.c": num(c), f"s{k}.enc.g1": num(g1), f"s{k}.enc.g2": num(g2), f"s{k}.vq.q": num(q),
                f"s{k}.vq.g_q": num(gq), f"s{k}.vq.loss_q": num(loss_q),
                f"s{k}.vq.codes": np.stack([num(x) for x in codes], -1).reshape(c.shape[0], -1),
                f"s{k}.vq.global_tokens": np.stack([num(x) for x in toks], -1),
                f"s{k}.gen.y_hat": num(mods["generator"].calls[0])})
    for fam in ("mpd", "msd"):
        for phase, i in (("dstep", 0), ("gstep", 1)):
            rs, gs, _, _ = mods[fam].calls[i]
            for j, (r, g) in enumerate(zip(rs, gs)):
                rec[f"s{k}.{phase}.{fam}.real_logits{j}"], rec[f"s{k}.{phase}.{fam}.fake_logits{j}"] = num(r), num(g)
    for phase, i in (("dstep", 0), ("gstep", 2)):
        for side, o in (("real", 0), ("fake", 1)):
            for j, z in enumerate(mods["mstftd"].calls[i + o][0]):
                rec[f"s{k}.{phase}.stft.{side}_logits{j}"] = num(z)


def types_proxy(torch):
    """``torch`` for train.py with ``torch.device('cuda:0')`` -> the CPU (the one change to the run)."""
    import types
    proxy = types.ModuleType("torch_cpu")
    proxy.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    proxy.device = lambda *_: torch.device("cpu")
    return proxy


def spread(out):
    """reference/{inputs,step,update}.npz from the reference run; tolerance.json: per array, max|Δ| / max|ref|
    of the float64 and the 1-thread rerun."""
    runs = {r: dict(np.load(os.path.join(out, "runs", r + ".npz"))) for r in ("ref", "f64", "thread1")}
    ref = runs["ref"]
    os.makedirs(os.path.join(out, "reference"), exist_ok=True)
    np.savez_compressed(os.path.join(out, "reference", "reference.npz"), **ref)
    tol = {}
    for r in ("f64", "thread1"):
        tol[r] = {}
        for k, v in ref.items():
            a, b = np.asarray(v, np.float64), np.asarray(runs[r][k], np.float64)
            cols = [(k, a, b)]
            if k.endswith("grad_stats"):  # rows: parameters; columns: sum, Σ|g|, Σg², max|g| (size: exact)
                cols += [(f"{k}.col{c}", a[:, c], b[:, c]) for c in range(4)]
            for name, a, b in cols:
                m = np.abs(a).max() if a.size else 0.0
                tol[r][name] = float(np.abs(a - b).max() / m) if m > 0 else float(np.abs(b).max() if b.size else 0.0)
    with open(os.path.join(out, "reference", "tolerance.json"), "w") as f:
        json.dump(tol, f, indent=0, sort_keys=True)
