"""The "whale" speech encoder of VITA-1.5 and its speech adapter (``adpter``, sic), with the key
table for ``model.audio_encoder.*`` (the official ``train.yaml`` is read by ``vita_jax.convert.release``).

Pipeline on a zero-padded fbank batch ``[B, T, 80]`` (lengths ``[B]``):
global CMVN (also on padded frames, as official) -> Conv2dSubsampling4 (two 3x3 stride-2 convs +
ReLU, channel-major flatten, Linear) -> embed (Linear, LayerNorm, ReLU) -> x·sqrt(d) (no position
added) -> blocks of pre-LN "rel-enc" attention (score = ((q+u)·k_j + (q+v)·p_j)/sqrt(d_k) with p_j
the projected sinusoid row of the *absolute* key index; no rel-shift; masked scores -65504 then
zeroed) and ReLU FFN -> after_norm. Adapter: zero padded frames, right-pad 4, Conv1d k5 s2,
LayerNorm eps 1e-3, GELU (or ReLU per yaml), Linear to the LLM width.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vita_jax import parallel
from vita_jax.layers.norms import LayerNorm
from vita_jax.models.common import config_from_mapping, remat_policy
from vita_jax.models.keys import KeyRule, T

_init = nn.initializers.normal(0.02)
HUB_ID = "VITA-MLLM/VITA-1.5_AudioEnc"
MASK_FILL = -65504.0  # the float16 minimum the official code fills masked scores with


@dataclasses.dataclass(frozen=True)
class WhaleConfig:
    input_dim: int = 80
    attention_dim: int = 1024       # encoder width (subsampling output too)
    attention_heads: int = 16
    linear_units: int = 4096
    num_blocks: int = 24
    max_positions: int = 5000       # rows of the sinusoid table: ~200 s of speech
    chunk_size: int = -1            # > 0: static block-causal chunks (official option)
    left_chunks: int = -1
    llm_embed_dim: int = 3584
    kernel_size: int = 5
    activation: str = "gelu"        # adapter activation (yaml model_conf.activation_func)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"

    @property
    def d_k(self) -> int:
        return self.attention_dim // self.attention_heads

    @property
    def freq_out(self) -> int:
        return ((self.input_dim - 1) // 2 - 1) // 2

    @property
    def max_frames(self) -> int:
        """The longest fbank input the position table covers (``max_positions`` encoder rows)."""
        return 4 * self.max_positions + 3

    @staticmethod
    def llm_length(frames):
        """fbank frames -> LLM tokens of one clip (see :func:`llm_length`)."""
        return llm_length(frames)

    @classmethod
    def from_config(cls, audio, **kw) -> "WhaleConfig":
        """From an ``ml_collections`` sub-config (or any mapping with the same fields)."""
        return config_from_mapping(cls, audio, **kw)


def encoder_length(frames):
    """fbank frames -> whale encoder frames: ``((T - 1) // 2 - 1) // 2`` (two stride-2 3x3 convs)."""
    return ((np.asarray(frames) - 1) // 2 - 1) // 2


def llm_length(frames):
    """fbank frames -> LLM tokens (``lengths_for_llm``): encoder frames then the stride-2 adapter."""
    return (encoder_length(frames) - 1) // 2 + 1


@functools.lru_cache(maxsize=None)
def sinusoid_table(n: int, d: int) -> np.ndarray:
    """``[n, d]`` float32: sin at even channels, cos at odd (ESPnet/WeNet PositionalEncoding)."""
    pos = np.arange(n, dtype=np.float32)[:, None]
    div = np.exp(np.arange(0, d, 2, dtype=np.float32) * np.float32(-(np.log(10000.0) / d)))
    pe = np.zeros((n, d), np.float32)
    pe[:, 0::2] = np.sin(pos * div)
    pe[:, 1::2] = np.cos(pos * div)
    return pe


def subsample_mask(valid):
    """Frame mask ``[B, T]`` -> encoder mask ``[B, T']`` as official (``[2::2][2::2]``)."""
    return valid[:, 2::2][:, 2::2]


def chunk_mask(t: int, chunk: int, left: int) -> np.ndarray:
    """Static block-causal mask ``[t, t]``: query i sees chunks up to its own, ``left`` chunks back
    (all when < 0), as WeNet's ``subsequent_chunk_mask``."""
    i = np.arange(t)
    start = np.zeros(t, int) if left < 0 else np.maximum((i // chunk - left) * chunk, 0)
    end = np.minimum((i // chunk + 1) * chunk, t)
    j = np.arange(t)[None, :]
    return (j >= start[:, None]) & (j < end[:, None])


class RelEncAttention(nn.Module):
    cfg: WhaleConfig

    @nn.compact
    def __call__(self, x, pos_emb, mask):
        """``x [B, T, d]``, ``pos_emb [T, d]``, ``mask [B, T(q) or 1, T(k)]`` bool -> ``[B, T, d]``."""
        c = self.cfg
        h, dk = c.attention_heads, c.d_k

        def lin(name, inp, bias=True):
            return nn.DenseGeneral((h, dk), use_bias=bias, dtype=c.dtype, param_dtype=c.param_dtype, name=name,
                                   kernel_init=nn.with_logical_partitioning(_init, ("embed", "heads", "head_dim")),
                                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                          ("heads", "head_dim")))(inp)
        q, k, v = lin("linear_q", x), lin("linear_k", x), lin("linear_v", x)
        p = lin("linear_pos", pos_emb.astype(c.dtype), bias=False)  # [T, h, dk]
        u = self.param("pos_bias_u", nn.with_logical_partitioning(_init, ("heads", "head_dim")), (h, dk), c.param_dtype)
        vb = self.param("pos_bias_v", nn.with_logical_partitioning(_init, ("heads", "head_dim")), (h, dk),
                        c.param_dtype)
        ac = jnp.einsum("bqhd,bkhd->bhqk", q + u.astype(c.dtype), k)
        bd = jnp.einsum("bqhd,khd->bhqk", q + vb.astype(c.dtype), p)
        scores = (ac + bd) / np.sqrt(dk).astype(np.float32)
        m = mask[:, None]
        scores = jnp.where(m, scores, MASK_FILL)
        probs = jnp.where(m, jax.nn.softmax(scores.astype(jnp.float32), axis=-1), 0.0).astype(c.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return nn.DenseGeneral(c.attention_dim, axis=(-2, -1), dtype=c.dtype, param_dtype=c.param_dtype,
                               name="linear_out",
                               kernel_init=nn.with_logical_partitioning(_init, ("heads", "head_dim", "embed")),
                               bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(out)


class Block(nn.Module):
    cfg: WhaleConfig
    keep_hidden: bool = False

    @nn.compact
    def __call__(self, x, pos_emb, mask):
        c = self.cfg
        y = LayerNorm(c.attention_dim, 1e-5, c.param_dtype, name="norm1")(x)
        x = x + RelEncAttention(c, name="self_attn")(y, pos_emb, mask)
        y = LayerNorm(c.attention_dim, 1e-5, c.param_dtype, name="norm2")(x)
        y = nn.Dense(c.linear_units, dtype=c.dtype, param_dtype=c.param_dtype, name="w_1",
                     kernel_init=nn.with_logical_partitioning(_init, ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(y)
        y = nn.Dense(c.attention_dim, dtype=c.dtype, param_dtype=c.param_dtype, name="w_2",
                     kernel_init=nn.with_logical_partitioning(_init, ("mlp", "embed")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(jax.nn.relu(y))
        x = parallel.constrain(x + y, ("batch", "length", "act_embed"))
        return x, (x if self.keep_hidden else None)


def _dense(c, feats, name, axes):
    return nn.Dense(feats, dtype=c.dtype, param_dtype=c.param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(_init, axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)))


class WhaleEncoder(nn.Module):
    """``features [B, T, 80]`` (fbank, zero-padded, before CMVN), ``lengths [B]`` ->
    ``(out [B, T', d], mask [B, T'])``; with ``keep_hidden`` also a dict of intermediates."""
    cfg: WhaleConfig
    keep_hidden: bool = False

    @nn.compact
    def __call__(self, features, lengths):
        c = self.cfg
        f32 = jnp.float32
        mean = self.param("cmvn_mean", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                          (c.input_dim,), f32)
        istd = self.param("cmvn_istd", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                          (c.input_dim,), f32)
        t = features.shape[1]
        valid = jnp.arange(t)[None, :] < lengths[:, None]
        x = ((features.astype(f32) - mean) * istd).astype(c.dtype)
        x = x[..., None]  # [B, T, F, 1]: time as height, one channel
        for name in ("conv_0", "conv_2"):
            x = jax.nn.relu(nn.Conv(c.attention_dim, (3, 3), strides=(2, 2), padding="VALID", dtype=c.dtype,
                                    param_dtype=c.param_dtype, name=name,
                                    kernel_init=nn.with_logical_partitioning(_init, (None, None, None, "embed")),
                                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(x))
        b, t2, f2, ch = x.shape
        x = jnp.transpose(x, (0, 1, 3, 2)).reshape(b, t2, ch * f2)  # channel-major flatten (c·F' + f)
        sub = _dense(c, c.attention_dim, "subsampling_out", ("mm_in", "embed"))(x)
        mask = subsample_mask(valid)
        x = _dense(c, c.attention_dim, "embed_linear", ("embed", "mlp"))(sub)
        x = jax.nn.relu(LayerNorm(c.attention_dim, 1e-5, c.param_dtype, name="embed_norm")(x))
        embed_out = x
        x = x * np.sqrt(c.attention_dim).astype(np.float32)
        if t2 > c.max_positions:
            raise ValueError(f"{t2} encoder frames exceed the {c.max_positions}-row position table "
                             f"(~{c.max_positions * 4 // 100} s of audio per clip)")
        pos = jnp.asarray(sinusoid_table(c.max_positions, c.attention_dim)[:t2])
        att_mask = mask[:, None, :]
        if c.chunk_size > 0:
            att_mask = att_mask & jnp.asarray(chunk_mask(t2, c.chunk_size, c.left_chunks))[None]
        block = Block
        if c.remat_policy != "none":
            block = nn.remat(block, prevent_cse=False, policy=remat_policy(c.remat_policy))
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast), length=c.num_blocks,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x, hidden = stack(c, self.keep_hidden, name="encoders")(x, pos, att_mask)
        out = LayerNorm(c.attention_dim, 1e-5, c.param_dtype, name="after_norm")(x)
        if self.keep_hidden:
            return out, mask, dict(subsampling_out=sub, embed_out=embed_out, pos_emb=pos, block_outs=hidden)
        return out, mask


class Adapter(nn.Module):
    """``adpter``: ``x [B, T', d]``, ``mask [B, T']`` -> ``([B, ceil(T'/2), llm], mask[:, 0::2])``."""
    cfg: WhaleConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.cfg
        x = jnp.where(mask[..., None], x, 0.0)
        x = jnp.pad(x, ((0, 0), (0, c.kernel_size - 1), (0, 0)))
        x = nn.Conv(2 * c.attention_dim, (c.kernel_size,), strides=(2,), padding="VALID", dtype=c.dtype,
                    param_dtype=c.param_dtype, name="conv1d2",
                    kernel_init=nn.with_logical_partitioning(_init, (None, "embed", "mlp")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
        conv_out = x
        x = LayerNorm(2 * c.attention_dim, 1e-3, c.param_dtype, name="bn2")(x)
        x = jax.nn.gelu(x, approximate=False) if c.activation == "gelu" else jax.nn.relu(x)
        x = _dense(c, c.llm_embed_dim, "project", ("mlp", "embed"))(x)
        return parallel.constrain(x, ("batch", "length", "act_embed")), mask[:, 0::2], conv_out


class WhaleAudioEncoder(nn.Module):
    """Encoder + adapter: ``(features [B, T, 80], lengths [B])`` -> dict with ``encoder_out``,
    ``encoder_mask``, ``embeds [B, T'', llm]``, ``mask [B, T'']`` (and intermediates with
    ``keep_hidden``). Flax tree: ``encoder/...``, ``adpter/...``."""
    cfg: WhaleConfig
    keep_hidden: bool = False

    @nn.compact
    def __call__(self, features, lengths):
        enc = WhaleEncoder(self.cfg, self.keep_hidden, name="encoder")(features, lengths)
        out, mask = enc[0], enc[1]
        embeds, emask, conv_out = Adapter(self.cfg, name="adpter")(out, mask)
        res = dict(encoder_out=out, encoder_mask=mask, embeds=embeds, mask=emask)
        if self.keep_hidden:
            res.update(enc[2], adapter_conv_out=conv_out)
        return res


def key_table(cfg: WhaleConfig, prefix: str = "model.audio_encoder.") -> list[KeyRule]:
    """Official ``model.audio_encoder.*`` keys <-> Flax paths of :class:`WhaleAudioEncoder`."""
    h, dk = cfg.attention_heads, cfg.d_k
    e, E = f"{prefix}encoder.", ("encoder",)

    def lin(key, path, tr=T.linear):
        return [KeyRule(key + ".weight", path + ("kernel",), tr), KeyRule(key + ".bias", path + ("bias",), T.same)]

    def norm(key, path):
        return [KeyRule(key + ".weight", path + ("weight",), T.same), KeyRule(key + ".bias", path + ("bias",), T.same)]

    rules = [KeyRule(e + "global_cmvn.mean", E + ("cmvn_mean",), T.same),
             KeyRule(e + "global_cmvn.istd", E + ("cmvn_istd",), T.same)]
    rules += (lin(e + "enc.0.core.conv.0", E + ("conv_0",), T.conv2d)
              + lin(e + "enc.0.core.conv.2", E + ("conv_2",), T.conv2d))
    rules += lin(e + "enc.0.core.out.0", E + ("subsampling_out",))
    rules += lin(e + "enc.1.embed.0", E + ("embed_linear",)) + norm(e + "enc.1.embed.1", E + ("embed_norm",))
    L, LP = e + "enc.1.encoders.{i}.", E + ("encoders",)
    for n in ("q", "k", "v"):
        key, path = L + f"self_attn.linear_{n}", LP + ("self_attn", f"linear_{n}")
        rules += [KeyRule(key + ".weight", path + ("kernel",), T.linear_to_heads(h, dk)),
                  KeyRule(key + ".bias", path + ("bias",), T.split_heads(h, dk))]
    rules += lin(L + "self_attn.linear_out", LP + ("self_attn", "linear_out"), T.heads_to_linear(h, dk))
    rules += [KeyRule(L + "self_attn.linear_pos.weight", LP + ("self_attn", "linear_pos", "kernel"),
                      T.linear_to_heads(h, dk)),
              KeyRule(L + "self_attn.pos_bias_u", LP + ("self_attn", "pos_bias_u"), T.same),
              KeyRule(L + "self_attn.pos_bias_v", LP + ("self_attn", "pos_bias_v"), T.same)]
    rules += lin(L + "feed_forward.w_1", LP + ("w_1",)) + lin(L + "feed_forward.w_2", LP + ("w_2",))
    rules += norm(L + "norm1", LP + ("norm1",)) + norm(L + "norm2", LP + ("norm2",))
    rules += norm(e + "enc.1.after_norm", E + ("after_norm",))
    a, A = f"{prefix}adpter.", ("adpter",)
    rules += (lin(a + "conv1d2", A + ("conv1d2",), T.conv1d) + norm(a + "bn2", A + ("bn2",))
              + lin(a + "project", A + ("project",)))
    return rules

