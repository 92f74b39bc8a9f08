"""TiCodec, the speech tokenizer / vocoder of VITA-1.5 (``VQVAE`` in the official code), defined once for
training and inference (upstream TiCodec ``models.py``).

Generator: quantized frames (40 Hz) + the 128-d global vector -> 24 kHz waveform (HiFi-GAN style:
conv_pre, 4 transposed-conv stages each followed by the mean of 3 ResBlock1s, the global vector added
where the channel count is 128, conv_post, tanh). Encoder + quantizer: waveform -> codes and global
tokens (8 fixed ones are VITA's voice).

* Layout is PyTorch's (``[B, C, T]``, :mod:`vita_jax.models.codec_layers`) so the official state dicts
  map 1:1: every Flax module / variable is named by its official key part (``ups.0``, ``resblocks.3``,
  ``conv_pre`` ...) and the official key of a leaf is its Flax path joined by ``.``. Collections:
  ``params`` (what the optimisers own) and ``buffers`` (BatchNorm running statistics).
* ``folded=False`` (training): weight norm live (``weight_g``, ``weight_v``). ``folded=True``
  (inference): one ``weight`` per weight-normed conv, folded once at load from the official
  ``weight_g`` / ``weight_v`` by :func:`fold_state_dict` (as ``remove_weight_norm``).
* The global branch ends in BatchNorm1d in batch-statistics mode when ``buffers`` is mutable (running
  mean / unbiased running variance updated with momentum 0.1, ``num_batches_tracked`` + 1 per call),
  in eval mode otherwise.
* The quantizer is straight-through with codebook + commitment terms and no EMA (:func:`quantize`);
  inference assigns codes with :func:`nearest`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vita_jax.models import codec_layers
from vita_jax.models.codec_layers import (
    LRELU,
    BatchNorm1d,
    GroupNorm,
    Linear,
    PlainConv,
    WNConv,
    WNConvTranspose1d,
    leaky_relu,
)


@dataclasses.dataclass(frozen=True)
class TiCodecConfig:
    upsample_rates: tuple = (8, 5, 5, 3)
    upsample_kernel_sizes: tuple = (16, 11, 11, 5)
    upsample_initial_channel: int = 512
    resblock_kernel_sizes: tuple = (3, 7, 11)
    resblock_dilation_sizes: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    n_codes: int = 1024
    global_code_num: int = 8
    global_feature_conv: tuple = (128, 64, 128, 3, 1)
    global_tokens: tuple = (473, 975, 419, 219, 565, 121, 550, 616)
    sampling_rate: int = 24000
    code_dim: int = 512          # hard-coded in the official code (conv_pre input, encoder conv_post)

    @property
    def hop(self) -> int:
        return int(np.prod(self.upsample_rates))

    def to_model_json(self) -> dict:
        return dict(resblock="1", upsample_rates=list(self.upsample_rates),
                    upsample_kernel_sizes=list(self.upsample_kernel_sizes),
                    upsample_initial_channel=self.upsample_initial_channel,
                    resblock_kernel_sizes=list(self.resblock_kernel_sizes),
                    resblock_dilation_sizes=[list(d) for d in self.resblock_dilation_sizes], n_code_groups=1,
                    residul_layer=1, n_codes=self.n_codes, global_code_num=self.global_code_num,
                    global_feature_conv=list(self.global_feature_conv), global_tokens=list(self.global_tokens),
                    sampling_rate=self.sampling_rate)

    @classmethod
    def from_model_json(cls, path: str) -> "TiCodecConfig":
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a TiCodec model.json: {e}") from e

    @classmethod
    def from_dict(cls, h: dict) -> "TiCodecConfig":
        """From ``model.json``'s fields (KeyError / TypeError / ValueError on a missing or bad one)."""
        if str(h.get("resblock", "1")) != "1" or int(h.get("n_code_groups", 1)) != 1 or \
                int(h.get("residul_layer", 1)) != 1:
            raise ValueError("only resblock '1', n_code_groups 1 and residul_layer 1 are supported")
        return cls(upsample_rates=tuple(h["upsample_rates"]), upsample_kernel_sizes=tuple(h["upsample_kernel_sizes"]),
                   upsample_initial_channel=int(h["upsample_initial_channel"]),
                   resblock_kernel_sizes=tuple(h["resblock_kernel_sizes"]),
                   resblock_dilation_sizes=tuple(tuple(d) for d in h["resblock_dilation_sizes"]),
                   n_codes=int(h["n_codes"]), global_code_num=int(h["global_code_num"]),
                   global_feature_conv=tuple(h["global_feature_conv"]),
                   global_tokens=tuple(h.get("global_tokens", ())), sampling_rate=int(h.get("sampling_rate", 24000)))


@dataclasses.dataclass(frozen=True)
class CodecTrainConfig:
    """The hyper-parameters ``train.py`` reads from ``model.json`` (same names)."""
    codec: TiCodecConfig
    segment_size: int = 24000
    num_mels: int = 80
    n_fft: int = 1024
    hop_size: int = 240
    win_size: int = 1024
    fmin: float = 0
    fmax: Optional[float] = 8000
    fmax_for_loss: Optional[float] = None
    learning_rate: float = 2e-4
    adam_b1: float = 0.5
    adam_b2: float = 0.9
    lr_decay: float = 0.98
    batch_size: int = 160
    seed: int = 1234
    codebook_loss_lambda: float = 1.0
    commitment_loss_lambda: float = 0.25
    disc_div: int = 1  # discriminator channel divisor (1, 2, 4 or 8): not upstream's; only tiny configs change it

    @property
    def sampling_rate(self) -> int:
        return self.codec.sampling_rate

    @classmethod
    def from_model_json(cls, path: str) -> "CodecTrainConfig":
        try:
            with open(path) as f:
                h = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a TiCodec model.json: {e}") from e
        return cls.from_dict(h, path)

    @classmethod
    def from_dict(cls, h: dict, where: str = "config.codec") -> "CodecTrainConfig":
        """From ``model.json``'s fields; ``where`` names the source in the one-line error."""
        names = {f.name for f in dataclasses.fields(cls)} - {"codec"}
        try:
            return cls(codec=TiCodecConfig.from_dict(h), **{k: h[k] for k in names if k in h})
        except KeyError as e:
            raise ValueError(f"{where}: missing TiCodec field {e}") from e
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: bad TiCodec training field: {e}") from e

    def to_model_json(self) -> dict:
        out = self.codec.to_model_json()
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                    if f.name != "codec" and not (f.name == "disc_div" and self.disc_div == 1)})
        out.update(num_gpus=1, num_freq=self.n_fft // 2 + 1, num_workers=0)
        return out


def real_size_config() -> CodecTrainConfig:
    """VITA-1.5's released codec (``vita_tts_ckpt/codec/model.json``, = Freeze-Omni's; spec
    VITA15_SPEECH_OUTPUT §2.1) with its training fields (upstream TiCodec's recipe: batch 160 of 1 s
    at 24 kHz over 8 GPUs, Adam 2e-4 (0.5, 0.9), decay 0.98 per epoch): stage 3.1 at full size."""
    codec = TiCodecConfig(upsample_rates=(8, 5, 5, 3), upsample_kernel_sizes=(16, 11, 11, 5),
                          upsample_initial_channel=512, resblock_kernel_sizes=(3, 7, 11),
                          resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)), n_codes=1024, global_code_num=8,
                          global_feature_conv=(128, 64, 128, 3, 1),
                          global_tokens=(473, 975, 419, 219, 565, 121, 550, 616), sampling_rate=24000)
    return CodecTrainConfig(codec=codec, segment_size=24000, num_mels=80, n_fft=1024, hop_size=240, win_size=1024,
                            fmin=0, fmax=8000, fmax_for_loss=None, learning_rate=2e-4, adam_b1=0.5, adam_b2=0.9,
                            lr_decay=0.98, batch_size=160, seed=1234, codebook_loss_lambda=1.0,
                            commitment_loss_lambda=0.25)


# ------------------------------------------------------------------------------ modules
class ResBlock1(nn.Module):
    channels: int
    kernel: int
    dilations: tuple
    folded: bool = False

    @nn.compact
    def __call__(self, x):
        c, k = self.channels, self.kernel
        for m, d in enumerate(self.dilations):
            t = WNConv(c, c, (k,), padding=(k * d - d) // 2, dilation=d, folded=self.folded,
                       name=f"convs1.{m}")(leaky_relu(x, LRELU))
            t = WNConv(c, c, (k,), padding=(k - 1) // 2, folded=self.folded, name=f"convs2.{m}")(
                leaky_relu(t, LRELU))
            x = t + x
        return x


class Generator(nn.Module):
    """Quantized frames ``[B, 512, T]`` + global vector ``[B, 128]`` -> waveform ``[B, 1, hop·T]``."""
    cfg: TiCodecConfig
    folded: bool = False

    @nn.compact
    def __call__(self, x, g):
        c = self.cfg
        nk, ch = len(c.resblock_kernel_sizes), c.upsample_initial_channel
        x = WNConv(ch, c.code_dim, (7,), padding=3, folded=self.folded, name="conv_pre")(x)
        self.sow("intermediates", "conv_pre_out", x)
        for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes)):
            x = WNConvTranspose1d(ch // 2, ch, k, u, (k - u) // 2, folded=self.folded, name=f"ups.{i}")(
                leaky_relu(x, LRELU))
            self.sow("intermediates", f"ups{i}_out", x)
            ch //= 2
            xs = None
            for j, (kk, dd) in enumerate(zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes)):
                r = ResBlock1(ch, kk, tuple(dd), self.folded, name=f"resblocks.{i * nk + j}")(x)
                xs = r if xs is None else xs + r
            x = xs / nk
            if ch == g.shape[-1]:
                x = x + g[:, :, None]
        x = leaky_relu(x, LRELU)
        self.sow("intermediates", "conv_post_in", x)
        return jnp.tanh(WNConv(1, ch, (7,), padding=3, folded=self.folded, name="conv_post")(x))


class GlobalTokenEncoder(nn.Module):
    """3 x (conv no bias, lrelu 0.1) -> time mean -> Linear -> lrelu 0.1 -> BatchNorm1d. ``[B, in, T] -> [B, out]``."""
    cfg: TiCodecConfig

    @nn.compact
    def __call__(self, x):
        cin, hid, cout, k, s = self.cfg.global_feature_conv
        for n, (i, o) in zip((0, 2, 4), ((cin, hid), (hid, hid), (hid, cout))):
            x = leaky_relu(PlainConv(o, i, (k,), s, (k - s) // 2, use_bias=False, name=f"conv.{n}")(x), LRELU)
        x = Linear(cout, cout, name="fn.0")(jnp.mean(x, axis=2))
        self.sow("intermediates", "linear", x)
        x = leaky_relu(x, LRELU)
        self.sow("intermediates", "prebn", x)
        return BatchNorm1d(cout, name="fn.2")(x)


class Encoder(nn.Module):
    """Crop 1 ``[B, 1, L]`` (and the global crop) -> ``(c [B, 512, L/hop], g1 [B, 128], g2 or None)``;
    ``g2`` (stages 1-2 + the global branch on the second crop) is detached as upstream."""
    cfg: TiCodecConfig
    folded: bool = False

    @nn.compact
    def __call__(self, y, y_global=None):
        c = self.cfg
        stages = list(reversed(list(zip(c.upsample_rates, c.upsample_kernel_sizes))))
        kernels, dils = list(reversed(c.resblock_kernel_sizes)), list(reversed(c.resblock_dilation_sizes))
        nk, half = len(kernels), len(stages) // 2
        conv_pre = WNConv(32, 1, (7,), padding=3, folded=self.folded, name="conv_pre")
        norms, ups, rbs = [], [], []
        for i, (u, k) in enumerate(stages):
            ch = 32 * 2 ** (i + 1)
            for j in range(nk):  # upstream registers normalize before ups / resblocks (state-dict order)
                norms.append(GroupNorm(ch // 16, ch, name=f"normalize.{i * nk + j}"))
        for i, (u, k) in enumerate(stages):
            ch = 32 * 2 ** (i + 1)
            ups.append(WNConv(ch, ch // 2, (k,), stride=u, padding=(k - u) // 2, folded=self.folded,
                              name=f"ups.{i}"))
        for i in range(len(stages)):
            ch = 32 * 2 ** (i + 1)
            rbs += [ResBlock1(ch, kernels[j], tuple(dils[j]), self.folded, name=f"resblocks.{i * nk + j}")
                    for j in range(nk)]
        conv_post = PlainConv(c.code_dim, c.code_dim, (3,), padding=1, name="conv_post")
        linear = Linear(128, 128, name="linear.0")  # defined upstream, never used by forward
        gte = GlobalTokenEncoder(c, name="GlobalTokenEncoder")
        if self.is_initializing():
            linear(jnp.zeros((1, 128)))

        def run(x, lo, hi):
            for i in range(lo, hi):
                x = ups[i](leaky_relu(x, LRELU))
                xs = None
                for j in range(nk):
                    r = rbs[i * nk + j](x)
                    xs = norms[i * nk + j](r if xs is None else xs + r)
                x = xs / nk
            return x

        x = conv_pre(y)
        self.sow("intermediates", "conv_pre_out1", x)
        mid = run(x, 0, half)
        self.sow("intermediates", "mid1", mid)
        g1 = gte(mid)
        out = conv_post(leaky_relu(run(mid, half, len(stages)), 0.01))
        g2 = None
        if y_global is not None:
            x2 = conv_pre(y_global)
            self.sow("intermediates", "conv_pre_out2", x2)
            mid2 = run(x2, 0, half)
            self.sow("intermediates", "mid2", mid2)
            g2 = jax.lax.stop_gradient(gte(mid2))
        return out, g1, g2


# ------------------------------------------------------------------------------ quantizer
def quantizer_init(cfg: TiCodecConfig, key) -> dict:
    """Official codebook init: uniform(-1/n_codes, 1/n_codes); keys as in the ``quantizer`` state dict."""
    n, gd = cfg.n_codes, 128 // cfg.global_code_num
    keys = jax.random.split(key, cfg.global_code_num + 1)
    u = lambda k, s: jax.random.uniform(k, s, jnp.float32, -1.0 / n, 1.0 / n)  # noqa: E731
    out = {"quantizer_modules.0.embedding.weight": u(keys[0], (n, cfg.code_dim))}
    for j in range(cfg.global_code_num):
        out[f"quantizer_modules_globaltokens.{j}.embedding.weight"] = u(keys[j + 1], (n, gd))
    return out


def _vq(x, book):
    """``x [N, d]`` -> (nearest rows, codes); distance ``Σx² + Σe² − 2x·e`` as upstream."""
    d = jnp.sum(x * x, 1, keepdims=True) + jnp.sum(book * book, 1) - 2.0 * x @ book.T
    idx = jnp.argmin(d, 1)
    return book[idx], idx


def quantize(qparams: dict, c, g, cfg: TiCodecConfig, lam_book: float = 1.0, lam_commit: float = 0.25):
    """Upstream ``Quantizer.forward`` (one residual level, one code group): ``c [B, 512, T]``,
    ``g [B, 128]`` -> ``(q [B, 512, T], loss, codes [B, T], g_q [B, 128], tokens [B, G])``."""
    sg = jax.lax.stop_gradient
    B, D, T = c.shape
    x = c.transpose(0, 2, 1).reshape(-1, D)
    z, codes = _vq(x, qparams["quantizer_modules.0.embedding.weight"])
    z = z.reshape(B, T, D)
    xin = c.transpose(0, 2, 1)
    loss_local = lam_book * jnp.mean(jnp.square(z - sg(xin))) + lam_commit * jnp.mean(jnp.square(sg(z) - xin))
    q = (xin + sg(z - xin)).transpose(0, 2, 1)
    G = cfg.global_code_num
    chunks = jnp.split(g.reshape(-1, 128), G, axis=-1)
    zs, toks = zip(*[_vq(ch, qparams[f"quantizer_modules_globaltokens.{j}.embedding.weight"])
                     for j, ch in enumerate(chunks)])
    zg = jnp.concatenate(zs, -1).reshape(g.shape)
    loss_global = lam_book * jnp.mean(jnp.square(zg - sg(g))) + lam_commit * jnp.mean(jnp.square(sg(zg) - g))
    gq = g + sg(zg - g)
    aux = dict(local_loss=loss_local, global_loss=loss_global)
    return q, loss_local + loss_global, codes.reshape(B, T), gq, jnp.stack(toks, -1), aux


def nearest(x, codebook):
    """Official VQ assignment: ``argmin (Σx² + Σe² − 2 x·eᵀ)`` (first index on ties). ``[N, d]`` -> ``[N]``."""
    d = jnp.sum(x * x, -1, keepdims=True) + jnp.sum(codebook * codebook, -1)[None] - 2.0 * x @ codebook.T
    return jnp.argmin(d, axis=-1)


def global_vector(quantizer, tokens):
    """Concatenated global codebook rows ``[128]`` for ``tokens [global_code_num]``."""
    return jnp.concatenate([quantizer["globaltokens"][j][t] for j, t in enumerate(tokens)])


# ------------------------------------------------------------------------------ inference form
def fold_state_dict(sd: dict) -> dict:
    """An official generator / encoder state dict -> the same keys (numpy) with every ``weight_g`` /
    ``weight_v`` pair folded into ``weight`` (:func:`fold_weight_norm`): the ``folded`` modules' state dict."""
    out = {}
    for key, v in sd.items():
        mod, _, leaf = key.rpartition(".")
        if leaf == "weight_g":
            out[mod + ".weight"] = codec_layers.fold_weight_norm(v, sd[mod + ".weight_v"])
        elif leaf != "weight_v":
            out[key] = np.asarray(v)
    return out


def folded_templates(cfg: TiCodecConfig) -> dict:
    """``{"generator", "encoder"}``: the abstract variables (``params``, ``buffers``) of the folded modules."""
    gen, enc = Generator(cfg, folded=True), Encoder(cfg, folded=True)
    x, g, w = jnp.zeros((1, cfg.code_dim, 2)), jnp.zeros((1, 128)), jnp.zeros((1, 1, cfg.hop * 2))
    return {"generator": jax.eval_shape(lambda: gen.init(jax.random.PRNGKey(0), x, g)),
            "encoder": jax.eval_shape(lambda: enc.init(jax.random.PRNGKey(0), w))}
