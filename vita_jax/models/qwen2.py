"""Qwen2 / Qwen2.5 decoder-only LLM (the language model of VITA-1.5) and its PyTorch key table.

The Flax tree keeps the official names: ``model/embed_tokens/embedding``,
``model/layers/{input_layernorm,self_attn/{q,k,v,o}_proj,post_attention_layernorm,mlp/*}`` (all
layers stacked on a leading ``layers`` axis by ``nn.scan``), ``model/norm/weight``,
``lm_head/kernel``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vita_jax import parallel
from vita_jax.layers.attention import Attention, causal_padding_mask, resolve_implementation
from vita_jax.layers.mlp import SwiGLU
from vita_jax.layers.norms import RMSNorm
from vita_jax.layers.rope import rope_cos_sin
from vita_jax.layers.splash import kernel_segment_ids
from vita_jax.models.common import config_from_mapping, remat_policy
from vita_jax.models.keys import KeyRule, T


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int = 152064
    hidden_size: int = 3584
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    intermediate_size: int = 18944
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    dtype: Any = jnp.float32          # compute dtype
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"
    # None (XLA), "xla", "cudnn", "splash", "tokamax" or "auto" (per platform:
    # vita_jax.layers.attention.resolve_implementation). Default None: "auto" on GPU means cuDNN, which
    # assumes right padding in cache-free forwards (the VITA splice layout guarantees it; VITA configs set
    # "auto"), while a direct caller may left-pad (tokamax takes left padding: padding is one run of its own).
    attention_impl: Optional[str] = None
    attention_interpret: bool = False  # run the splash kernel in the Pallas interpreter (CPU tests)
    attention_bias: bool = True  # q/k/v biases (False gives a Llama layer)

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config(cls, llm, **kw) -> "Qwen2Config":
        """From an ``ml_collections`` sub-config (or any mapping with the same fields)."""
        return config_from_mapping(cls, llm, **kw)

    def num_params(self) -> int:
        e, m, h, k, d = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                         self.num_key_value_heads, self.dim_head)
        layer = e * (h + 2 * k) * d + (h + 2 * k) * d + h * d * e + 3 * e * m + 2 * e
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.num_hidden_layers * layer + e + head


@flax.struct.dataclass
class KVCache:
    """Decoding state. ``k, v [layers, batch, slots, kv_heads, head_dim]``; ``valid [batch, slots]``
    marks slots that hold real tokens; ``index`` is the next slot to write (a scalar: the same for
    every row, or ``[batch]``: one per row, as the live server's slot batch keeps it);
    ``next_pos [batch]`` the rotary position of each row's next token."""
    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array
    next_pos: jax.Array

    @classmethod
    def init(cls, cfg: Qwen2Config, batch: int, slots: int, dtype=None) -> "KVCache":
        shape = (cfg.num_hidden_layers, batch, slots, cfg.num_key_value_heads, cfg.dim_head)
        dtype = dtype or cfg.dtype
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, slots), bool),
                   jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32))


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``. ``x [batch, q, embed]``."""
    cfg: Qwen2Config

    @nn.compact
    def __call__(self, x, cache, cos, sin, mask, kv_lengths, cache_index, segment_ids=None):
        c = self.cfg
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, c.param_dtype, name="input_layernorm")(x)
        a, new_cache = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.dim_head,
                                 c.dtype, c.param_dtype, c.attention_impl, c.attention_bias, c.attention_interpret,
                                 name="self_attn")(
            h, cos, sin, mask=mask, kv_lengths=kv_lengths, cache=cache, cache_index=cache_index,
            segment_ids=segment_ids)
        x = x + a
        h = RMSNorm(c.hidden_size, c.rms_norm_eps, c.param_dtype, name="post_attention_layernorm")(x)
        x = x + SwiGLU(c.hidden_size, c.intermediate_size, c.dtype, c.param_dtype, name="mlp")(h)
        return parallel.constrain(x, ("batch", "length", "act_embed")), new_cache


class Qwen2Model(nn.Module):
    """Embeddings, the scanned layer stack and the final norm (HF ``Qwen2Model``)."""
    cfg: Qwen2Config

    def setup(self):
        c = self.cfg
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
        layer = DecoderLayer
        if c.remat_policy != "none":
            layer = nn.remat(layer, prevent_cse=False, policy=remat_policy(c.remat_policy))
        self.layers = nn.scan(
            layer, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})(c)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.param_dtype)

    def embed(self, input_ids):
        """``[batch, length]`` int ids -> ``[batch, length, embed]``."""
        return self.embed_tokens(input_ids)

    def __call__(self, x, attention_mask, positions, cache: Optional[KVCache], segment_ids=None):
        c = self.cfg
        b, t = x.shape[:2]
        x = parallel.constrain(x.astype(c.dtype), ("batch", "length", "act_embed"))
        valid = attention_mask.astype(bool)
        kv_lengths, mask, layer_cache, index = None, None, None, jnp.zeros((), jnp.int32)
        kernel_ids = None
        impl = resolve_implementation(c.attention_impl, c.dtype, c.dim_head, segment_ids is not None, cache is not None)
        if cache is None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            if impl in ("splash", "tokamax"):  # segment ids, no dense mask (padding: an id no real token has;
                # tokamax: each id one contiguous run, as the packer and right/left padding lay them out)
                kernel_ids = kernel_segment_ids(valid, segment_ids)
            elif impl == "cudnn" and segment_ids is None:
                kv_lengths = valid.sum(-1).astype(jnp.int32)
            else:  # packed rows (segment ids) take the mask path: the cuDNN call here knows right padding only
                slots = jnp.arange(t)
                mask = causal_padding_mask(valid, slots, slots)
                if segment_ids is not None:
                    mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
        else:
            index = cache.index
            if index.ndim == 0:
                q_slots = index + jnp.arange(t)
                valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, index))
            else:  # per-row write slots (a serving batch whose rows joined at different times)
                q_slots = index[:, None] + jnp.arange(t)
                valid = cache.valid.at[jnp.arange(b)[:, None], q_slots].set(valid)
            if positions is None:
                steps = jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1
                positions = cache.next_pos[:, None] + jnp.maximum(steps, 0)
            mask = causal_padding_mask(valid, q_slots, jnp.arange(cache.valid.shape[1]))
            layer_cache = (cache.k, cache.v)
        cos, sin = rope_cos_sin(positions, c.dim_head, c.rope_theta)
        x, new_kv = self.layers(x, layer_cache, cos, sin, mask, kv_lengths, index, kernel_ids)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(new_kv[0], new_kv[1], valid, index + t,
                                cache.next_pos + attention_mask.astype(jnp.int32).sum(-1))
        return self.norm(x), new_cache


class Qwen2ForCausalLM(nn.Module):
    """``input_ids [batch, length]`` (or ``inputs_embeds [batch, length, embed]``) -> logits
    ``[batch, length, vocab]`` in the compute dtype, plus the updated :class:`KVCache` when one is
    given. ``attention_mask [batch, length]`` (1 = real token) defaults to all ones; positions
    default to ``0..length-1`` without a cache (as the official forward) and to the running count
    of real tokens with one (as HF ``generate``). ``logits_index [batch]`` keeps only that position
    per row (``[batch, 1, vocab]``), which is what decoding needs."""
    cfg: Qwen2Config

    def setup(self):
        c = self.cfg
        self.model = Qwen2Model(c)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(
                c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")))

    def embed(self, input_ids):
        return self.model.embed(input_ids)

    def hidden(self, input_ids=None, attention_mask=None, positions=None, inputs_embeds=None,
               cache: Optional[KVCache] = None, segment_ids=None):
        """Final (normed) hidden states ``[batch, length, embed]`` and the updated cache: what
        :meth:`head` turns into logits (the LM loss applies it chunk by chunk)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.model.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if attention_mask is None:
            attention_mask = jnp.ones(x.shape[:2], jnp.int32)
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) are for training forwards, not for cached decoding")
        return self.model(x, attention_mask, positions, cache, segment_ids)

    def head(self, h):
        """Hidden states ``[batch, length, embed]`` -> logits ``[batch, length, vocab]`` (compute dtype)."""
        logits = self.model.embed_tokens.attend(h) if self.cfg.tie_word_embeddings else self.lm_head(h)
        return parallel.constrain(logits, ("batch", "length", "act_vocab"))

    def __call__(self, input_ids=None, attention_mask=None, positions=None, inputs_embeds=None,
                 cache: Optional[KVCache] = None, logits_index=None, segment_ids=None):
        h, new_cache = self.hidden(input_ids, attention_mask, positions, inputs_embeds, cache, segment_ids)
        if logits_index is not None:
            h = jnp.take_along_axis(h, logits_index[:, None, None].astype(jnp.int32), axis=1)
        return self.head(h), new_cache


def key_table(cfg: Qwen2Config, prefix: str = "") -> list[KeyRule]:
    """Official (PyTorch / safetensors) key <-> Flax path, relative to the LLM's own tree.
    ``{i}`` marks the layer index, which becomes the leading (scan) axis of the Flax leaf."""
    h, k, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_head
    L = f"{prefix}model.layers.{{i}}."
    rules = [KeyRule(f"{prefix}model.embed_tokens.weight", ("model", "embed_tokens", "embedding"), T.same)]
    for name, heads in (("q_proj", h), ("k_proj", k), ("v_proj", k)):
        p = ("model", "layers", "self_attn", name)
        rules += [KeyRule(L + f"self_attn.{name}.weight", p + ("kernel",), T.linear_to_heads(heads, d)),
                  KeyRule(L + f"self_attn.{name}.bias", p + ("bias",), T.split_heads(heads, d))]
    rules.append(KeyRule(L + "self_attn.o_proj.weight", ("model", "layers", "self_attn", "o_proj", "kernel"),
                         T.heads_to_linear(h, d)))
    for name in ("gate_proj", "up_proj", "down_proj"):
        rules.append(KeyRule(L + f"mlp.{name}.weight", ("model", "layers", "mlp", name, "kernel"), T.linear))
    for name in ("input_layernorm", "post_attention_layernorm"):
        rules.append(KeyRule(L + f"{name}.weight", ("model", "layers", name, "weight"), T.same))
    rules.append(KeyRule(f"{prefix}model.norm.weight", ("model", "norm", "weight"), T.same))
    if not cfg.tie_word_embeddings:
        rules.append(KeyRule(f"{prefix}lm_head.weight", ("lm_head", "kernel"), T.linear))
    return rules
