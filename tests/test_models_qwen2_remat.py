"""Every remat policy gives the same loss and gradients as no remat (scan layout unchanged)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vita_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM


@pytest.mark.slow  # a minute or more on 2 cores: outside the quick loop
def test_remat_policies_same_gradients():
    base = Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 10)), jnp.int32)
    params = Qwen2ForCausalLM(base).init(jax.random.PRNGKey(0), ids)["params"]

    def grads(policy):
        m = Qwen2ForCausalLM(Qwen2Config(**{**base.__dict__, "remat_policy": policy}))

        def loss(p):
            logits, _ = m.apply({"params": p}, input_ids=ids)
            return jax.nn.log_softmax(logits).mean()
        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref_g = grads("none")
    for policy in ("full", "dots", "dots_no_batch", "qkv_proj"):
        loss, g = grads(policy)
        assert abs(float(loss - ref_loss)) < 1e-6
        diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g, ref_g))
        assert max(diffs) < 1e-6, policy
