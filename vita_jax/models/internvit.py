"""InternViT-300M-448px (VITA-1.5's vision encoder) and its PyTorch key table.

Conv patch embedding, CLS token, learned position embedding (bicubically resized, exactly like
``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``, when the patch grid
differs from the trained one), pre-LayerNorm blocks with fused biased qkv, exact GELU MLP and layer
scales ``ls1``/``ls2``; no final norm. Flax tree (official names): ``embeddings/{class_embedding,
patch_embedding, position_embedding}``, ``encoder/layers/{norm1, attn/{qkv, proj}, ls1, norm2,
mlp/{fc1, fc2}, ls2}`` with layers stacked by ``nn.scan``.
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
HUB_ID = "OpenGVLab/InternViT-300M-448px"


@dataclasses.dataclass(frozen=True)
class InternViTConfig:
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat_policy: str = "none"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """LLM positions one tile becomes: the patch grid after the x0.5 pixel shuffle."""
        return (self.grid // 2) ** 2

    @classmethod
    def from_config(cls, vision, **kw) -> "InternViTConfig":
        """From an ``ml_collections`` sub-config (or any mapping with the same fields)."""
        return config_from_mapping(cls, vision, **kw)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights of PyTorch's bicubic resize (A = -0.75, align_corners=False,
    no antialias, borders clamped), so that ``y = W @ x`` along one axis."""
    # float32 throughout, like PyTorch's CPU kernel (scale, source index and coefficients)
    f = np.float32
    a = f(-0.75)
    w = np.zeros((n_out, n_in), np.float32)
    scale = f(n_in) / f(n_out)
    for i in range(n_out):
        src = scale * (f(i) + f(0.5)) - f(0.5)
        i0 = int(np.floor(src))
        t = f(src - f(i0))
        x1, x2 = t + f(1), f(1) - t
        coeffs = [((a * x1 - f(5) * a) * x1 + f(8) * a) * x1 - f(4) * a,
                  ((a + f(2)) * t - (a + f(3))) * t * t + f(1),
                  ((a + f(2)) * x2 - (a + f(3))) * x2 * x2 + f(1),
                  ((a * (x2 + f(1)) - f(5) * a) * (x2 + f(1)) + f(8) * a) * (x2 + f(1)) - f(4) * a]
        for k, c in enumerate(coeffs):
            w[i, min(max(i0 - 1 + k, 0), n_in - 1)] += c
    return w.astype(np.float32)


def resize_pos_embed(pos, grid_in: int, h: int, w: int):
    """``pos [grid_in*grid_in, C]`` (patch part, row-major) -> ``[h*w, C]`` resized bicubically."""
    if (h, w) == (grid_in, grid_in):
        return pos
    p = pos.astype(jnp.float32).reshape(grid_in, grid_in, -1)
    p = jnp.einsum("hi,ijc->hjc", bicubic_matrix(grid_in, h), p)
    p = jnp.einsum("wj,hjc->hwc", bicubic_matrix(grid_in, w), p)
    return p.reshape(h * w, -1).astype(pos.dtype)


def normalise_pixels(pixels, mean, std):
    """8-bit RGB tiles ``[..., 3, S, S]`` (uint8, after the processor's resize and crop) -> the CLIP
    processor's float32 values ``(x / 255 - mean) / std`` per channel. The 3 x 256 values are computed
    once in numpy, each step in float32 as the official processor does, and looked up: numpy arrays
    (the host) and jax arrays (inside the jitted model, where XLA would turn the divisions into
    multiplications) get bitwise the same values."""
    v = np.arange(256, dtype=np.float32) / np.float32(255.0)
    table = ((v[None] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]).reshape(-1)
    channel = (256 * np.arange(3, dtype=np.int32))[:, None, None]  # row of each channel in the flat table
    if isinstance(pixels, np.ndarray):
        return table[pixels.astype(np.int32) + channel]
    return jnp.take(jnp.asarray(table), pixels.astype(jnp.int32) + channel, axis=0)


class Embeddings(nn.Module):
    """``pixels [n, 3, H, W]`` (NCHW, as the official processor emits) -> ``[n, 1 + P, C]``."""
    cfg: InternViTConfig

    @nn.compact
    def __call__(self, pixels):
        c = self.cfg
        cls = self.param("class_embedding", nn.with_logical_partitioning(_init, (None, None, "embed")),
                         (1, 1, c.hidden_size), c.param_dtype)
        x = jnp.transpose(pixels, (0, 2, 3, 1)).astype(c.dtype)
        x = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
                    padding="VALID", dtype=c.dtype, param_dtype=c.param_dtype, name="patch_embedding",
                    kernel_init=nn.with_logical_partitioning(_init, (None, None, None, "embed")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(x)
        n, gh, gw, ch = x.shape
        x = x.reshape(n, gh * gw, ch)
        pos = self.param("position_embedding", nn.with_logical_partitioning(_init, (None, None, "embed")),
                         (1, c.grid * c.grid + 1, c.hidden_size), c.param_dtype)
        pos = jnp.concatenate([pos[0, :1], resize_pos_embed(pos[0, 1:], c.grid, gh, gw)], axis=0)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(c.dtype), (n, 1, ch)), x], axis=1)
        return x + pos.astype(c.dtype)[None]


class Block(nn.Module):
    """``h + ls1 * attn(norm1(h))`` then ``h + ls2 * mlp(norm2(h))``; ``x [n, tokens, C]``."""
    cfg: InternViTConfig
    keep_hidden: bool = False

    @nn.compact
    def __call__(self, x, _):
        c = self.cfg

        def scale(name):
            return self.param(name, nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                              (c.hidden_size,), c.param_dtype).astype(c.dtype)

        y = LayerNorm(c.hidden_size, c.layer_norm_eps, c.param_dtype, name="norm1")(x)
        y = _Attn(c, name="attn")(y)
        x = x + scale("ls1") * y
        y = LayerNorm(c.hidden_size, c.layer_norm_eps, c.param_dtype, name="norm2")(x)
        y = _MLP(c, name="mlp")(y)
        x = parallel.constrain(x + scale("ls2") * y, ("batch", "length", "act_embed"))
        return x, (x if self.keep_hidden else None)


class _Attn(nn.Module):
    cfg: InternViTConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        h, d = c.num_attention_heads, c.head_dim
        qkv = nn.DenseGeneral((3, h, d), use_bias=c.qkv_bias, dtype=c.dtype, param_dtype=c.param_dtype,
                              name="qkv",
                              kernel_init=nn.with_logical_partitioning(_init, ("embed", None, "heads", "head_dim")),
                              bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                     (None, "heads", "head_dim")))(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = jax.nn.dot_product_attention(q, k, v)
        return nn.DenseGeneral(c.hidden_size, axis=(-2, -1), dtype=c.dtype, param_dtype=c.param_dtype, name="proj",
                               kernel_init=nn.with_logical_partitioning(_init, ("heads", "head_dim", "embed")),
                               bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(out)


class _MLP(nn.Module):
    cfg: InternViTConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        x = nn.Dense(c.intermediate_size, dtype=c.dtype, param_dtype=c.param_dtype, name="fc1",
                     kernel_init=nn.with_logical_partitioning(_init, ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
        x = jax.nn.gelu(x, approximate=False)
        return nn.Dense(c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype, name="fc2",
                        kernel_init=nn.with_logical_partitioning(_init, ("mlp", "embed")),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(x)


class Encoder(nn.Module):
    cfg: InternViTConfig
    keep_hidden: bool = False

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        block = Block
        if c.remat_policy != "none":
            block = nn.remat(block, prevent_cse=False, policy=remat_policy(c.remat_policy))
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0,
                        length=c.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        return stack(c, self.keep_hidden, name="layers")(x, None)


class InternViT(nn.Module):
    """``pixels [n, 3, H, W]`` -> last hidden state ``[n, 1 + (H/14)(W/14), C]`` (CLS first).
    With ``keep_hidden`` also returns all hidden states ``[1 + layers, n, tokens, C]`` (embeddings
    first, like HF ``output_hidden_states``)."""
    cfg: InternViTConfig
    keep_hidden: bool = False

    @nn.compact
    def __call__(self, pixels):
        x = Embeddings(self.cfg, name="embeddings")(pixels)
        x = parallel.constrain(x, ("batch", "length", "act_embed"))
        out, hidden = Encoder(self.cfg, self.keep_hidden, name="encoder")(x)
        if self.keep_hidden:
            return out, jnp.concatenate([x[None], hidden], axis=0)
        return out


def key_table(cfg: InternViTConfig, prefix: str = "") -> list[KeyRule]:
    """Official key (``prefix`` + InternVisionModel name) <-> Flax path in the InternViT tree."""
    h, d = cfg.num_attention_heads, cfg.head_dim
    e = f"{prefix}embeddings."
    rules = [KeyRule(e + "class_embedding", ("embeddings", "class_embedding"), T.same),
             KeyRule(e + "position_embedding", ("embeddings", "position_embedding"), T.same),
             KeyRule(e + "patch_embedding.weight", ("embeddings", "patch_embedding", "kernel"), T.conv2d),
             KeyRule(e + "patch_embedding.bias", ("embeddings", "patch_embedding", "bias"), T.same)]
    L = f"{prefix}encoder.layers.{{i}}."
    lp = ("encoder", "layers")
    rules += [KeyRule(L + "attn.qkv.weight", lp + ("attn", "qkv", "kernel"), T.linear_to_heads(3, h, d)),
              KeyRule(L + "attn.proj.weight", lp + ("attn", "proj", "kernel"), T.heads_to_linear(h, d)),
              KeyRule(L + "attn.proj.bias", lp + ("attn", "proj", "bias"), T.same),
              KeyRule(L + "mlp.fc1.weight", lp + ("mlp", "fc1", "kernel"), T.linear),
              KeyRule(L + "mlp.fc1.bias", lp + ("mlp", "fc1", "bias"), T.same),
              KeyRule(L + "mlp.fc2.weight", lp + ("mlp", "fc2", "kernel"), T.linear),
              KeyRule(L + "mlp.fc2.bias", lp + ("mlp", "fc2", "bias"), T.same),
              KeyRule(L + "ls1", lp + ("ls1",), T.same),
              KeyRule(L + "ls2", lp + ("ls2",), T.same)]
    if cfg.qkv_bias:
        rules.append(KeyRule(L + "attn.qkv.bias", lp + ("attn", "qkv", "bias"), T.split_heads(3, h, d)))
    for n in ("norm1", "norm2"):
        rules += [KeyRule(L + f"{n}.weight", lp + (n, "weight"), T.same),
                  KeyRule(L + f"{n}.bias", lp + (n, "bias"), T.same)]
    return rules
