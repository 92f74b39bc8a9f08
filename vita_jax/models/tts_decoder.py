"""The NAR + AR speech decoder of VITA-1.5 (``LLM2TTSCodecAR`` in the official code) and its key
table for ``vita_tts_ckpt/decoder/final.pt``.

Input: the LLM's *input-embedding* rows of the reply text, each split row-major into 4 vectors
(``[B, 4·n_text, idim]``). A bidirectional Llama stack (``layers_pre_nn``, ``num_blocks // 2``
layers, no final norm), then ``[emb(BOS); nar]`` followed by ``emb(SOS)`` and the codes through
the AR Llama stack (``layers``) with the prefix-LM mask, final RMSNorm, ``out_fnn`` (with bias)
over the V codes + 4 specials (BOS V, SOS V+1, EOS V+2, PAD V+3). Llama layers here are the Qwen2
layer without q/k/v biases (rotary base 10000, RMSNorm eps 1e-6).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vita_jax.layers.chunked import PrefixLMMask
from vita_jax.layers.norms import RMSNorm
from vita_jax.layers.rope import rope_cos_sin
from vita_jax.models import qwen2
from vita_jax.models.common import remat_policy
from vita_jax.models.keys import KeyRule, T

_init = nn.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class TTSDecoderConfig:
    idim: int = 896                 # = transformer_attention_dim = encoder_output_dim
    odim: int = 1024                # V, the codec vocabulary
    attention_heads: int = 14
    linear_units: int = 4864
    num_blocks: int = 4             # AR layers; NAR layers = num_blocks // 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    # training forward only (inference keeps its cache path): "xla" = the dense boolean [B, 1, T, T] mask;
    # "chunked" = the mask as a rule, queries in blocks (layers/chunked.py): no [T, T] value kept per layer
    attention_impl: str = "xla"
    attention_chunk: int = 512      # "chunked": queries per block
    remat_policy: str = "none"      # per layer of both stacks (models/common.py's names)

    def __post_init__(self):
        if self.attention_impl not in ("xla", "chunked"):
            raise ValueError(f"tts.attention_impl {self.attention_impl!r}: expected 'xla' or 'chunked'")
        if self.remat_policy != "none":
            remat_policy(self.remat_policy)  # a ValueError naming the policies for an unknown name

    @property
    def bos(self) -> int:
        return self.odim

    @property
    def sos(self) -> int:
        return self.odim + 1

    @property
    def eos(self) -> int:
        return self.odim + 2

    @property
    def pad(self) -> int:
        return self.odim + 3

    def layer_config(self, n_layers: int) -> qwen2.Qwen2Config:
        return qwen2.Qwen2Config(vocab_size=self.odim + 4, hidden_size=self.idim, num_hidden_layers=n_layers,
                                 num_attention_heads=self.attention_heads, num_key_value_heads=self.attention_heads,
                                 intermediate_size=self.linear_units, rope_theta=self.rope_theta,
                                 rms_norm_eps=self.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                                 attention_bias=False, attention_impl="xla")

    def to_model_json(self) -> list:
        """The official ``[idim, odim, {args}]`` with the fields the official code reads."""
        args = dict(idim=self.idim, odim=self.odim, transformer_attention_dim=self.idim,
                    transformer_attention_heads=self.attention_heads, transformer_linear_units=self.linear_units,
                    transformer_num_blocks=self.num_blocks, transformer_dropout_rate=0.1, encoder_input_dim=self.idim,
                    encoder_output_dim=self.idim, encoder_drop_rate=0.1, encoder_criterion="ce",
                    kv_cache_prefix_finetune=0, encoder_pre_norm_type="ln", encoder_upsample_rate=9)
        return [self.idim, self.odim, args]

    @classmethod
    def from_model_json(cls, path: str, **kw) -> "TTSDecoderConfig":
        """The official ``decoder/model.json`` (a list ``[idim, odim, {args}]``; the dict wins)."""
        try:
            with open(path) as f:
                raw = json.load(f)
            args = raw[-1] if isinstance(raw, list) else raw
            c = cls(idim=int(args["idim"]), odim=int(args["odim"]),
                    attention_heads=int(args["transformer_attention_heads"]),
                    linear_units=int(args["transformer_linear_units"]),
                    num_blocks=int(args["transformer_num_blocks"]), **kw)
            width, out = int(args.get("transformer_attention_dim", c.idim)), int(args.get("encoder_output_dim", c.idim))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{path}: not a speech-decoder model.json: {e}") from e
        if width != c.idim or out != c.idim:
            raise ValueError(f"{path}: idim {c.idim}, transformer_attention_dim {width} and encoder_output_dim {out} "
                             "must be equal (the official code needs it)")
        if int(args.get("kv_cache_prefix_finetune", 0)):
            raise ValueError(f"{path}: kv_cache_prefix_finetune=1 (Freeze-Omni prefix layers) is not used by VITA-1.5")
        return c


class LlamaStack(nn.Module):
    """Scanned Llama layers with an explicit boolean mask ``[B, 1, Q, K]`` and optional KV cache
    ``(k, v)`` of ``[layers, B, S, heads, head_dim]`` written at ``cache_index``."""
    cfg: qwen2.Qwen2Config
    remat: str = "none"

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=0):
        cos, sin = rope_cos_sin(positions, self.cfg.dim_head, self.cfg.rope_theta)
        layer = qwen2.DecoderLayer
        if self.remat != "none":
            layer = nn.remat(layer, prevent_cse=False, policy=remat_policy(self.remat))
        stack = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                        length=self.cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        return stack(self.cfg, name="layers")(x, cache, cos, sin, mask, None, jnp.asarray(cache_index, jnp.int32))


class TTSDecoder(nn.Module):
    """Flax tree (official names): ``embedding``, ``layers_pre_nn`` (NAR), ``layers`` (AR), ``norm``, ``out_fnn``."""
    cfg: TTSDecoderConfig

    def setup(self):
        c = self.cfg
        self.embedding = nn.Embed(c.odim + 4, c.idim, dtype=c.dtype, param_dtype=c.param_dtype,
                                  embedding_init=nn.with_logical_partitioning(_init, ("vocab", "embed")))
        self.layers_pre_nn = LlamaStack(c.layer_config(c.num_blocks // 2), c.remat_policy)
        self.layers = LlamaStack(c.layer_config(c.num_blocks), c.remat_policy)
        self.norm = RMSNorm(c.idim, c.rms_norm_eps, c.param_dtype)
        self.out_fnn = nn.Dense(c.odim + 4, dtype=c.dtype, param_dtype=c.param_dtype,
                                kernel_init=nn.with_logical_partitioning(_init, ("embed", "vocab")),
                                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)))

    def _mask(self, rule: PrefixLMMask, length: int):
        if self.cfg.attention_impl == "chunked":
            return rule.replace(chunk=self.cfg.attention_chunk)
        return rule.dense(length)

    def _nar(self, x, x_lens):
        b, lx = x.shape[:2]
        x_lens = jnp.broadcast_to(jnp.asarray(x_lens, jnp.int32), (b,))
        mask = self._mask(PrefixLMMask(x_lens, jnp.int32(lx), x_lens * 0 + lx), lx)  # valid x valid
        pos = jnp.broadcast_to(jnp.arange(lx), (b, lx))
        return self.layers_pre_nn(x.astype(self.cfg.dtype), pos, mask)[0]

    def __call__(self, x, x_lens, y, y_lens):
        """Teacher-forced training forward. ``x [B, Lx, idim]``, ``y [B, Ly]`` codes padded with -1.
        Returns ``(logits [B, Ly+1, V+4], summed CE loss, targets [B, Ly+1])``."""
        c = self.cfg
        b, lx = x.shape[:2]
        ly = y.shape[1]
        y = jnp.where(y == -1, c.pad, y)
        h = self._nar(x, x_lens)
        text = jnp.concatenate([jnp.broadcast_to(self.embedding(jnp.asarray([c.bos]))[None], (b, 1, c.idim)), h], 1)
        lt, lt_i = 1 + lx, 1 + x_lens
        speech = self.embedding(jnp.concatenate([jnp.full((b, 1), c.sos), y], 1))
        ar_in = jnp.concatenate([text, speech], 1)
        t = lt + ly + 1
        targets = jnp.concatenate([y, jnp.full((b, 1), c.pad)], 1)
        targets = jnp.where(jnp.arange(ly + 1)[None] == y_lens[:, None], c.eos, targets)
        # the official prefix-LM mask: text both ways, speech causal and seeing the text, padding nothing
        rule = PrefixLMMask(lt_i.astype(jnp.int32), jnp.int32(lt), (lt + y_lens + 1).astype(jnp.int32))
        pos = jnp.broadcast_to(jnp.arange(t), (b, t))
        out, _ = self.layers(ar_in, pos, self._mask(rule, t))
        logits = self.out_fnn(self.norm(out[:, lt:]))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        loss = jnp.sum(jnp.where(targets != c.pad, nll, 0.0))
        return logits, loss, targets

    def prefill(self, x, cache_k, cache_v, length=None):
        """Inference prefix: NAR over ``x [1, L, idim]`` (the first ``length`` rows valid, default
        all), then ``[emb(BOS); nar]`` through the AR stack without any mask into the cache. Returns
        the updated ``(k, v)``. Rows past ``length`` (padding to a bucket) leave cache slots past
        ``length + 1`` that the steps overwrite before they can see them."""
        c = self.cfg
        b, lx = x.shape[:2]
        n = lx if length is None else length
        h = self._nar(x, jnp.full((b,), n))
        seq = jnp.concatenate([jnp.broadcast_to(self.embedding(jnp.asarray([c.bos]))[None], (b, 1, c.idim)), h], 1)
        s = cache_k.shape[2]
        mask = jnp.broadcast_to(jnp.arange(s)[None, None, None, :] < n + 1, (b, 1, lx + 1, s))
        _, (k, v) = self.layers(seq, jnp.broadcast_to(jnp.arange(lx + 1), (b, lx + 1)), mask, (cache_k, cache_v), 0)
        return k, v

    def step(self, token, index, cache_k, cache_v):
        """One AR step: ``token [B]`` at cache slot / position ``index`` -> ``(logits [B, V+4], k, v)``."""
        s = cache_k.shape[2]
        mask = (jnp.arange(s) <= index)[None, None, None, :]
        x = self.embedding(token[:, None])
        pos = jnp.full((token.shape[0], 1), index)
        out, (k, v) = self.layers(x, pos, jnp.broadcast_to(mask, (token.shape[0], 1, 1, s)), (cache_k, cache_v), index)
        return self.out_fnn(self.norm(out))[:, 0].astype(jnp.float32), k, v


def sampling_distribution(logits: np.ndarray, top_k: int, history=(), penalty_window: int = -1,
                          penalty: float = 1.1) -> np.ndarray:
    """The official rule: repetition penalty (window over ``[SOS] + generated``, duplicates divide
    again), softmax over all V+4 entries, keep the top k, renormalise. float32 ``[V+4]``."""
    logits = np.array(logits, np.float32)
    if penalty_window > 0:
        for tok in list(history)[-penalty_window:]:
            logits[tok] = logits[tok] / np.float32(penalty)
    e = np.exp(logits - logits.max())
    probs = e / e.sum()
    keep = np.argsort(-probs, kind="stable")[:top_k]
    out = np.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


def key_table(cfg: TTSDecoderConfig) -> list[KeyRule]:
    h, d = cfg.attention_heads, cfg.idim // cfg.attention_heads
    rules = [KeyRule("embedding.weight", ("embedding", "embedding"), T.same),
             KeyRule("norm.weight", ("norm", "weight"), T.same),
             KeyRule("out_fnn.weight", ("out_fnn", "kernel"), T.linear),
             KeyRule("out_fnn.bias", ("out_fnn", "bias"), T.same)]
    for stack in ("layers_pre_nn", "layers"):
        L, P = f"{stack}.{{i}}.", (stack, "layers")
        rules += [KeyRule(L + f"self_attn.{n}_proj.weight", P + ("self_attn", f"{n}_proj", "kernel"),
                          T.linear_to_heads(h, d)) for n in "qkv"]
        rules.append(KeyRule(L + "self_attn.o_proj.weight", P + ("self_attn", "o_proj", "kernel"),
                             T.heads_to_linear(h, d)))
        rules += [KeyRule(L + f"mlp.{n}.weight", P + ("mlp", n, "kernel"), T.linear)
                  for n in ("gate_proj", "up_proj", "down_proj")]
        rules += [KeyRule(L + f"{n}.weight", P + (n, "weight"), T.same)
                  for n in ("input_layernorm", "post_attention_layernorm")]
    return rules

