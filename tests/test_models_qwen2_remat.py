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


@pytest.mark.slow  # two gradients of the tiny whole model (~1 min)
def test_towers_take_their_own_remat_policy():
    """config.vision_remat_policy / audio_remat_policy override remat_policy for that tower only ("": follow it),
    and the whole model's LM loss gradients are the same under them as without remat."""
    import jax.numpy as jnp

    from vita_jax.data import synthetic
    from vita_jax.models import vita
    from vita_jax.train import stages, step
    c = stages.stage_config("1.2", "tiny")
    c.remat_policy, c.vision_remat_policy, c.audio_remat_policy = "dots_no_batch", "full", ""
    assert (vita.llm_config(c).remat_policy, vita.vision_config(c).remat_policy,
            vita.audio_config(c).remat_policy) == ("dots_no_batch", "full", "dots_no_batch")
    batch = jax.tree.map(jnp.asarray, next(iter(synthetic.synthetic_data(c)[0])))
    params = vita.init_params(c, seed=0)

    def grads(cfg):  # jitted: op-by-op dispatch of the whole model's backward took ~50 s each on 2 cores
        return jax.jit(jax.grad(lambda p: step.make_loss(cfg)(p, batch)[0]))(params)
    plain = c.copy_and_resolve_references()
    plain.remat_policy, plain.vision_remat_policy = "none", ""
    g0, g1 = grads(plain), grads(c)  # (gradients of the policies themselves: test_remat_policies_same_gradients)
    # against each tower's largest gradient (the key biases' gradients are 0 up to rounding: no per-leaf ratio)
    for part in g0:
        scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0[part]))
        err = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g0[part]), jax.tree.leaves(g1[part])))
        assert scale > 0 and err < 1e-5 * scale, (part, err, scale)
