"""Packing-aware attention kernels: the Pallas splash kernel (run in the Pallas interpreter on CPU)
against the XLA masked path, the model-level switch, and what ``auto`` picks per platform."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vita_jax.layers import attention
from vita_jax.layers.attention import causal_padding_mask, resolve_implementation
from vita_jax.layers.splash import kernel_segment_ids, splash_attention
from vita_jax.models.qwen2 import Qwen2Config, Qwen2ForCausalLM

from conftest import HANG_S, XLA_BASE, rel_err

TOL = 1e-5


def _packed_segments(batch, t):
    """Row 0: three examples then padding; row 1: one example then padding; later rows: full."""
    seg = np.ones((batch, t), np.int32)
    a, b, c = t * 5 // 16, t * 11 // 16, t * 15 // 16
    seg[0, a:b], seg[0, b:c], seg[0, c:] = 2, 3, 0
    seg[1, t * 3 // 4:] = 0
    return seg


def _qkv(batch, t, heads, kv_heads, d, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (batch, t, heads, d)), jax.random.normal(ks[1], (batch, t, kv_heads, d)),
            jax.random.normal(ks[2], (batch, t, kv_heads, d)))


def _xla_reference(q, k, v, seg):
    """The model's XLA path: causal & padding (segment 0) & same segment, as a dense mask."""
    valid = jnp.asarray(seg > 0)
    slots = jnp.arange(seg.shape[1])
    mask = causal_padding_mask(valid, slots, slots) & (seg[:, None, :, None] == seg[:, None, None, :])
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


@pytest.mark.parametrize("t, heads, kv_heads, packed", [
    (256, 2, 2, False),    # MHA, right padding only, one 256 block
    (100, 4, 1, True),     # GQA (one kv head), a packed row of 3 examples + padding, length padded to 128
])
def test_splash_matches_xla_masked_path(t, heads, kv_heads, packed):
    q, k, v = _qkv(2, t, heads, kv_heads, 16)
    seg = _packed_segments(2, t) if packed else np.where(np.arange(t)[None] < np.array([[t], [t // 2]]), 1, 0)
    valid = seg > 0
    ids = kernel_segment_ids(jnp.asarray(valid), jnp.asarray(seg))
    out = jax.jit(lambda q, k, v: splash_attention(q, k, v, ids, interpret=True))(q, k, v)
    ref = _xla_reference(q, k, v, seg)
    assert out.shape == ref.shape
    assert rel_err(out[valid], ref[valid]) <= TOL


def test_splash_forward_and_gradient_match_xla():
    q, k, v = _qkv(2, 128, 4, 2, 16, seed=1)  # GQA, 3 packed examples + padding in row 0
    seg = _packed_segments(2, 128)
    valid = jnp.asarray(seg > 0)
    ids = kernel_segment_ids(valid, jnp.asarray(seg))

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(valid[:, :, None, None], fn(q, k, v), 0.0) ** 2)

    def both(fn):
        return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss(fn), (0, 1, 2))(q, k, v)))(q, k, v)

    out, ours = both(lambda q, k, v: splash_attention(q, k, v, ids, interpret=True))
    ref, grads = both(lambda q, k, v: _xla_reference(q, k, v, seg))
    assert rel_err(out[valid], ref[valid]) <= TOL
    for a, b in zip(ours, grads):
        assert rel_err(a, b) <= TOL


def _tiny(**kw):
    return Qwen2Config(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, **kw)


def _packed_batch(t=128):
    seg = _packed_segments(2, t)
    positions = np.zeros_like(seg)
    for r in range(seg.shape[0]):  # positions restart at each example
        for s in np.unique(seg[r]):
            idx = np.nonzero(seg[r] == s)[0]
            positions[r, idx] = np.arange(len(idx))
    ids = np.random.default_rng(0).integers(1, 128, seg.shape) * (seg > 0)
    return jnp.asarray(ids), jnp.asarray((seg > 0).astype(np.int32)), jnp.asarray(positions), jnp.asarray(seg)


@pytest.mark.slow  # 10-25 s on 2 cores: outside the quick loop (pytest -m "not slow")
def test_qwen2_splash_forward_matches_xla_on_packed_batch():
    ids, mask, positions, seg = _packed_batch()
    xla = Qwen2ForCausalLM(_tiny(attention_impl="xla"))
    params = xla.init(jax.random.PRNGKey(0), ids[:, :8])["params"]
    splash = Qwen2ForCausalLM(_tiny(attention_impl="splash", attention_interpret=True))
    ref, _ = jax.jit(xla.apply)({"params": params}, ids, mask, positions, segment_ids=seg)
    out, _ = jax.jit(splash.apply)({"params": params}, ids, mask, positions, segment_ids=seg)
    valid = np.asarray(mask, bool)
    assert rel_err(out[valid], ref[valid]) <= TOL


@pytest.mark.slow  # ~10 s on 2 cores: outside the quick loop (pytest -m "not slow")
def test_auto_is_xla_on_cpu_and_bitwise_the_old_default():
    assert jax.default_backend() == "cpu"
    assert resolve_implementation("auto", jnp.bfloat16, 128, packed=True, cached=False) == "xla"
    assert resolve_implementation("auto", jnp.bfloat16, 128, packed=False, cached=False) == "xla"
    ids, mask, positions, seg = _packed_batch(32)
    old = Qwen2ForCausalLM(_tiny())
    params = old.init(jax.random.PRNGKey(0), ids[:, :8])["params"]
    a, _ = jax.jit(old.apply)({"params": params}, ids, mask, positions, segment_ids=seg)
    b, _ = jax.jit(Qwen2ForCausalLM(_tiny(attention_impl="auto")).apply)({"params": params}, ids, mask, positions,
                                                                           segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_auto_per_platform(monkeypatch):
    def pick(platform, dtype=jnp.bfloat16, head_dim=128, packed=False, cached=False):
        monkeypatch.setattr(attention.parallel, "current_platform", lambda: platform)
        return resolve_implementation("auto", dtype, head_dim, packed, cached)

    assert pick("tpu") == "splash" and pick("tpu", packed=True) == "splash"
    assert pick("tpu", cached=True) == "xla"
    assert pick("gpu") == "cudnn"
    assert pick("gpu", packed=True) == "tokamax"        # cuDNN via jax.nn takes lengths, not segment ids
    assert pick("gpu", dtype=jnp.float32) == "tokamax"  # cuDNN flash attention is 16-bit only
    assert pick("gpu", head_dim=256) == "tokamax"       # ... and head_dim <= 128
    assert pick("gpu", cached=True) == "xla"
    monkeypatch.setattr(attention, "have_tokamax", lambda: False)  # no "gpu" extra: the old masked path
    assert pick("gpu", packed=True) == "xla" and pick("gpu") == "cudnn"
    assert resolve_implementation("cudnn", jnp.float32, 64, True, False) == "cudnn"  # explicit: unchanged
    with pytest.raises(ValueError, match="attention_impl"):
        resolve_implementation("flash", jnp.float32, 64, False, False)


SHARDED = r"""
import os
os.environ["JAX_NUM_CPU_DEVICES"] = "4"
import jax, jax.numpy as jnp, numpy as np
from vita_jax import parallel
from vita_jax.layers.splash import splash_attention
ks = jax.random.split(jax.random.PRNGKey(0), 3)
seg = jnp.asarray(np.broadcast_to(np.arange(128) // 50, (4, 128)), jnp.int32)  # 3 segments per row
errs = []
for kv in (2, 1):  # kv heads split like the query heads; kv heads replicated (repeated before the kernel)
    q = jax.random.normal(ks[0], (4, 128, 4, 16))
    k, v = (jax.random.normal(x, (4, 128, kv, 16)) for x in ks[1:])
    ref = splash_attention(q, k, v, seg, interpret=True)
    mesh = parallel.make_mesh({"data": 2, "tensor": 2})
    with parallel.use_mesh(mesh):
        out = jax.jit(lambda q, k, v: splash_attention(q, k, v, seg, interpret=True))(q, k, v)
    errs.append(float(jnp.abs(out - ref).max() / jnp.abs(ref).max()))
print("ERRS", max(errs))
"""


@pytest.mark.slow  # 10-25 s on 2 cores: outside the quick loop (pytest -m "not slow")
def test_splash_under_a_mesh_shards_batch_and_heads():
    env = dict(os.environ)
    env["XLA_FLAGS"] = XLA_BASE  # the session's, without a device count of its own
    p = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=HANG_S)
    assert p.returncode == 0, p.stderr[-3000:]
    err = float(p.stdout.split("ERRS")[-1])
    assert err <= TOL
