"""Gated (SwiGLU) MLP."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vita_jax import parallel

_init = nn.initializers.normal(0.02)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``, no biases. ``x [batch, length, embed]`` -> same shape."""
    hidden_size: int
    intermediate_size: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        def dense(name, feats, axes):
            return nn.Dense(feats, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=nn.with_logical_partitioning(_init, axes), name=name)

        gate = dense("gate_proj", self.intermediate_size, ("embed", "mlp"))(x)
        up = dense("up_proj", self.intermediate_size, ("embed", "mlp"))(x)
        h = parallel.constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return dense("down_proj", self.hidden_size, ("mlp", "embed"))(h)
