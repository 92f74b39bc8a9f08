"""Stage 3.1: one TiCodec training step as upstream ``train.py`` runs it, jitted.

Order: encoder (crop 1 + the detached global crop) -> VQ -> generator (ŷ computed once) -> the
discriminator update (LSGAN over all 13 sub-discriminators on ``y`` and ``sg(ŷ)``) -> the generator
update through the *updated* discriminators (adversarial + 2 x feature matching + 45 x main mel L1 +
the 512 / 256 mel terms + 10 x VQ + 5 x (1 − cos) consistency). Two Adam optimisers (``betas`` from
the config, eps 1e-8, no clipping / weight decay); the learning rate is an argument of the step
(``lr0 · lr_decay ** epoch``, decayed per epoch on the host). The generator forward runs once: its
VJP is pulled back with the cotangents of (ŷ, VQ loss, consistency loss).

State (a dict pytree): ``gp`` / ``gb`` generator-side params / buffers ``{generator, encoder,
quantizer}``, ``dp`` / ``db`` discriminator side ``{mpd, msd, mstftd}``, ``gopt`` / ``dopt``
(``optax.ScaleByAdamState``: count, mu, nu), ``step``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from vita_jax.models import discriminators as dm
from vita_jax.models import ticodec as tt
from vita_jax.train.codec import losses as L

FAMILIES = ("mpd", "msd", "stft")  # reference names; the stft family is the mstftd module


@dataclasses.dataclass(frozen=True)
class CodecModels:
    cfg: tt.CodecTrainConfig
    generator: tt.Generator
    encoder: tt.Encoder
    mpd: dm.MultiPeriodDiscriminator
    msd: dm.MultiScaleDiscriminator
    mstftd: dm.MultiScaleSTFTDiscriminator

    @classmethod
    def build(cls, cfg: tt.CodecTrainConfig) -> "CodecModels":
        if cfg.disc_div not in (1, 2, 4, 8):
            raise ValueError(f"disc_div = {cfg.disc_div}: must be 1, 2, 4 or 8 (MSD's grouped convolutions)")
        d = int(cfg.disc_div)
        return cls(cfg, tt.Generator(cfg.codec), tt.Encoder(cfg.codec), dm.MultiPeriodDiscriminator(d),
                   dm.MultiScaleDiscriminator(d), dm.MultiScaleSTFTDiscriminator(d))


def init_variables(M: CodecModels, seed: int) -> tuple:
    """Fresh ``(gp, gb, dp, db)`` with the official initialisation."""
    c, L_ = M.cfg.codec, M.cfg.segment_size
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    y = jnp.zeros((2, 1, L_))
    ev = M.encoder.init(k[0], y, y)
    gv = M.generator.init(k[1], jnp.zeros((2, c.code_dim, L_ // c.hop)), jnp.zeros((2, 128)))
    gp = {"generator": gv["params"], "encoder": ev["params"], "quantizer": tt.quantizer_init(c, k[2])}
    gb = {"generator": {}, "encoder": ev["buffers"], "quantizer": {}}
    dv = {n: getattr(M, n).init(k[3 + i], y) for i, n in enumerate(("mpd", "msd", "mstftd"))}
    return gp, gb, {n: v["params"] for n, v in dv.items()}, {n: dict(v.get("buffers", {})) for n, v in dv.items()}


def new_state(gp, gb, dp, db, gopt=None, dopt=None, step: int = 0) -> dict:
    adam = optax.scale_by_adam()
    return dict(gp=gp, gb=gb, dp=dp, db=db, gopt=gopt or adam.init(gp), dopt=dopt or adam.init(dp),
                step=jnp.asarray(step, jnp.int32))


def generator_side(M: CodecModels, gp, gb, y, y_global):
    """``((ŷ [B, 1, L], loss_q, compare_loss), (encoder buffers, aux))``."""
    cfg = M.cfg
    (c, g1, g2), est = M.encoder.apply({"params": gp["encoder"], "buffers": gb["encoder"]}, y, y_global,
                                       mutable=["buffers", "intermediates"])
    cos = jnp.sum(g1 * g2, 1) / jnp.maximum(jnp.linalg.norm(g1, axis=1) * jnp.linalg.norm(g2, axis=1), 1e-8)
    compare = 1.0 - jnp.mean(cos)
    q, loss_q, codes, gq, toks, qaux = tt.quantize(gp["quantizer"], c, g1, cfg.codec, cfg.codebook_loss_lambda,
                                                   cfg.commitment_loss_lambda)
    y_hat, gst = M.generator.apply({"params": gp["generator"]}, q, gq, mutable=["intermediates"])
    aux = dict(c=c, g1=g1, g2=g2, cos=cos, q=q, codes=codes, g_q=gq, tokens=toks, enc=est["intermediates"],
               gen=gst["intermediates"], **qaux)
    return (y_hat, loss_q, compare), (est["buffers"], aux)


def discriminate(M: CodecModels, dp, db, y, y_hat):
    """All three families on real and fake (MSD real first: its power iterations) ->
    ``({fam: (real logits, fake logits, real fmaps, fake fmaps)}, new msd buffers, σ [2, n])``."""
    out = {}
    for fam, name in zip(FAMILIES, ("mpd", "msd", "mstftd")):
        mod, buf = getattr(M, name), db[name]
        (lr, fr), s1 = mod.apply({"params": dp[name], "buffers": buf}, y, mutable=["buffers", "intermediates"])
        buf = s1["buffers"] if name == "msd" else buf
        (lg, fg), s2 = mod.apply({"params": dp[name], "buffers": buf}, y_hat, mutable=["buffers", "intermediates"])
        out[fam] = (lr, lg, fr, fg)
        if name == "msd":
            new_msd = s2["buffers"]
            sig = jnp.stack([_sigmas(s1["intermediates"]), _sigmas(s2["intermediates"])])
    return out, new_msd, sig


def _sigmas(inter):
    d0 = inter["discriminators.0"]
    return jnp.stack([d0[n]["sigma"][0] for n in [f"convs.{j}" for j in range(7)] + ["conv_post"]])


def mels(cfg: tt.CodecTrainConfig, x, n_fft=None, hop=None):
    """Mel of ``x [B, L]`` with ``fmax_for_loss``; the config resolution unless ``n_fft`` / ``hop``."""
    return L.mel_spectrogram(x, n_fft or cfg.n_fft, cfg.num_mels, cfg.sampling_rate, hop or cfg.hop_size,
                             n_fft or cfg.win_size, cfg.fmin, cfg.fmax_for_loss)


def _adam(grads, opt, params, lr, b1, b2):
    upd, opt = optax.scale_by_adam(b1, b2, 1e-8).update(grads, opt, params)
    return jax.tree.map(lambda p, u: p - lr * u, params, upd), opt


def make_step(M: CodecModels, debug: bool = False):
    """``step(state, batch, lr) -> (state, metrics[, aux])``; ``batch``: ``y``, ``y_global`` ``[B, L]``,
    ``y_mel`` ``[B, num_mels, frames]`` (optional: computed from ``y``). ``debug`` also returns every
    intermediate, both gradients and the feature maps (parity tests)."""
    cfg = M.cfg
    b1, b2 = cfg.adam_b1, cfg.adam_b2

    def step(state, batch, lr):
        y, yg = batch["y"][:, None], batch["y_global"][:, None]
        y_mel = batch["y_mel"] if "y_mel" in batch else mels(cfg, batch["y"])  # the dataset's target, same function
        fwd = lambda gp: generator_side(M, gp, state["gb"], y, yg)  # noqa: E731
        (y_hat, loss_q, compare), vjp, (enc_buf, gaux) = jax.vjp(fwd, state["gp"], has_aux=True)
        y_hat_d = jax.lax.stop_gradient(y_hat)

        def d_loss(dp):
            out, msd_buf, sig = discriminate(M, dp, state["db"], y, y_hat_d)
            terms = {fam: L.discriminator_loss(o[0], o[1]) for fam, o in out.items()}
            return sum(t[0] for t in terms.values()), (terms, out, msd_buf, sig)

        (loss_d, (dterms, dout, msd_buf, sig_d)), dgrad = jax.value_and_grad(d_loss, has_aux=True)(state["dp"])
        dp, dopt = _adam(dgrad, state["dopt"], state["dp"], lr, b1, b2)
        db = {**state["db"], "msd": msd_buf}

        mel_r = {n: mels(cfg, y[:, 0], n, n * 30 // 128) for n in (512, 256, 128)}

        def g_loss(y_hat, loss_q, compare):
            out, msd_buf, sig = discriminate(M, dp, db, y, y_hat)
            x = y_hat[:, 0]
            mel_main = mels(cfg, x)
            mel_g = {n: mels(cfg, x, n, n * 30 // 128) for n in (512, 256, 128)}
            l1 = {n: L.l1(mel_r[n], mel_g[n]) for n in (512, 256, 128)}
            l1_main = L.l1(y_mel, mel_main)
            loss_mel = 45.0 * l1_main + l1[512] + l1[256]
            adv = {fam: L.generator_loss(o[1]) for fam, o in out.items()}
            fm = {fam: L.feature_loss(o[2], o[3]) for fam, o in out.items()}
            total = sum(a[0] for a in adv.values()) + sum(f[0] for f in fm.values()) + loss_mel + 10.0 * loss_q \
                + 5.0 * compare
            return total, dict(out=out, msd_buf=msd_buf, sig=sig, adv=adv, fm=fm, l1=l1, l1_main=l1_main,
                               loss_mel=loss_mel, mel_main=mel_main, mel_g=mel_g)

        (loss_g, gx), cts = jax.value_and_grad(g_loss, argnums=(0, 1, 2), has_aux=True)(y_hat, loss_q, compare)
        (ggrad,) = vjp(cts)
        gp, gopt = _adam(ggrad, state["gopt"], state["gp"], lr, b1, b2)
        new = dict(gp=gp, gb={**state["gb"], "encoder": enc_buf}, dp=dp, db={**db, "msd": gx["msd_buf"]},
                   gopt=gopt, dopt=dopt, step=state["step"] + 1)
        met = dict(gen_loss_total=loss_g, disc_loss_total=loss_d, loss_mel=gx["loss_mel"], loss_quantizer=loss_q,
                   mel_spec_error=gx["l1_main"], compare_loss=compare, loss_mel1=gx["l1"][512],
                   loss_mel2=gx["l1"][256], loss_mel3=gx["l1"][128])
        for fam in FAMILIES:
            met[f"loss_disc_{fam}"] = dterms[fam][0]
            met[f"loss_gen_{fam}"] = gx["adv"][fam][0]
            met[f"loss_fm_{fam}"] = gx["fm"][fam][0]
        if not debug:
            return new, met
        aux = dict(g=gaux, y_hat=y_hat, dterms=dterms, dout=dout, gx=gx, sigma=jnp.concatenate([sig_d, gx["sig"]]),
                   mel_r=mel_r, dgrad=dgrad, ggrad=ggrad)
        return new, met, aux

    return step
