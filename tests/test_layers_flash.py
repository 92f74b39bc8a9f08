"""The GPU attention path (tokamax, ``vita_jax.layers.flash``) on CPU: its XLA chunked kernel against the
XLA masked path, forward and gradients in float32 on packed rows with several segments and padding and
grouped-query heads, and the tiny Qwen2's logits, loss and gradients through it; no float ``[.., L, L]``
value in its jaxpr.

tokamax's Triton and Mosaic GPU kernels cannot run here (no interpreter switch: ``Op.__call__`` refuses a
device its ``supported_on`` rejects), but with tokamax's ``cross_compile`` option they trace: their
jaxprs, and that of the packed Qwen2 step as ``auto`` builds it on an sm90 GPU, are checked for square
values. Their numbers await a GPU."""
import os
import subprocess
import sys

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest
from test_layers_attention import TOL, _packed_batch, _packed_segments, _qkv, _tiny, _xla_reference

from vita_jax.layers import attention
from vita_jax.layers.flash import MULTIPLE, flash_attention, segment_starts
from vita_jax.layers.splash import kernel_segment_ids
from vita_jax.models.qwen2 import Qwen2ForCausalLM

from conftest import HANG_S, XLA_BASE, jaxpr_avals, rel_err

CPU_KERNELS = ("xla_chunked",)


def test_segment_starts():
    ids = jnp.array([[1, 1, 2, 2, 2, -1, -1], [-1, -1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(segment_starts(ids), [[0, 0, 2, 2, 2, 5, 5], [0, 0, 2, 2, 2, 2, 2]])


def _ids(seg):
    return kernel_segment_ids(jnp.asarray(seg > 0), jnp.asarray(seg))


@pytest.mark.parametrize("t, heads, kv_heads, packed, chunk", [
    (64, 2, 2, False, (16, 32)),   # MHA, right padding only, several chunks each way
    (100, 4, 1, True, (32, 16)),   # GQA (one kv head), 3 packed examples + padding, remainder chunks
    (48, 4, 2, True, (512, 1024)),  # one chunk bigger than the row (tokamax's default sizes)
])
def test_flash_matches_xla_masked_path(t, heads, kv_heads, packed, chunk):
    q, k, v = _qkv(2, t, heads, kv_heads, 16)
    seg = _packed_segments(2, t) if packed else np.where(np.arange(t)[None] < np.array([[t], [t // 2]]), 1, 0)
    valid = seg > 0
    ids = _ids(seg)
    out = jax.jit(lambda q, k, v: flash_attention(q, k, v, ids, kernels=CPU_KERNELS, chunk=chunk))(q, k, v)
    ref = _xla_reference(q, k, v, seg)
    assert out.shape == ref.shape
    assert rel_err(out[valid], ref[valid]) <= TOL


def _loss(fn, valid):
    return lambda q, k, v: jnp.sum(jnp.where(valid[:, :, None, None], fn(q, k, v), 0.0) ** 2)


def test_flash_forward_and_gradient_match_xla():
    q, k, v = _qkv(2, 128, 4, 2, 16, seed=1)  # GQA, 3 packed examples + padding in row 0
    seg = _packed_segments(2, 128)
    valid = jnp.asarray(seg > 0)
    ids = _ids(seg)

    def both(fn):
        return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(_loss(fn, valid), (0, 1, 2))(q, k, v)))(q, k, v)

    out, ours = both(lambda q, k, v: flash_attention(q, k, v, ids, kernels=CPU_KERNELS, chunk=(32, 32)))
    ref, grads = both(lambda q, k, v: _xla_reference(q, k, v, seg))
    assert rel_err(out[valid], ref[valid]) <= TOL
    for a, b in zip(ours, grads):
        assert a.shape == b.shape
        assert rel_err(a, b) <= TOL


def _squares(jaxpr, t):
    """The ``[.., n, n]`` values of a jaxpr, ``n`` the row length ``t`` or the kernels' padded length."""
    n = {t, -(-t // MULTIPLE) * MULTIPLE}
    return [a for a in jaxpr_avals(jaxpr) if len(getattr(a, "shape", ())) >= 2 and a.shape[-1] == a.shape[-2] in n]


def _square(fn, q, k, v, valid, t):
    """Dtypes of the ``[.., t, t]`` values of ``fn``'s forward and gradient."""
    step = lambda q, k, v: jax.value_and_grad(_loss(fn, valid), (0, 1, 2))(q, k, v)
    return {str(a.dtype) for a in _squares(jax.make_jaxpr(step)(q, k, v), t)}


def test_flash_holds_no_float_square_value():
    """With chunks smaller than the row, forward and backward hold no float ``[.., L, L]`` value (scores,
    probabilities or their cotangents); the XLA path holds them. tokamax's xla_chunked kernel does expand
    the segment starts to a boolean ``[batch, 1, L, L]`` mask (1 byte an entry): the only square value."""
    t = 200  # neither it nor 256 (padded) appears in another dimension: heads 4 / 2 of 16, chunks of 32
    q, k, v = _qkv(2, t, 4, 2, 16)
    seg = _packed_segments(2, t)
    valid, ids = jnp.asarray(seg > 0), _ids(seg)
    flash = _square(lambda q, k, v: flash_attention(q, k, v, ids, kernels=CPU_KERNELS, chunk=(32, 32)),
                    q, k, v, valid, t)
    xla = _square(lambda q, k, v: _xla_reference(q, k, v, seg), q, k, v, valid, t)
    assert flash <= {"bool"}, flash
    assert "float32" in xla  # the check can fail


KERNELS = ("pallas_call", "mpmd_map")  # Pallas Triton; Pallas Mosaic GPU (plgpu.kernel)


def _has_kernel(jaxpr):
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    return any(e.primitive.name in KERNELS or any(
        _has_kernel(sub) for p in e.params.values() for sub in (p if isinstance(p, (list, tuple)) else (p,))
        if isinstance(sub, (jex_core.Jaxpr, jex_core.ClosedJaxpr))) for e in jaxpr.eqns)


@pytest.fixture
def gpu_kernels_traceable(monkeypatch):
    """tokamax's ``cross_compile`` option lets its GPU kernels trace on a CPU host (``make_jaxpr`` only:
    nothing is lowered or run); Mosaic GPU also asks for an sm90 device: say there is one."""
    import tokamax
    from tokamax._src import gpu_utils
    monkeypatch.setattr(gpu_utils, "is_sm90", lambda device=None: True)
    with tokamax.config.cross_compile(True):
        yield


@pytest.mark.parametrize("kernel, dtype, square_in_backward", [
    ("mosaic_gpu", jnp.bfloat16, set()),  # forward and backward take the segment starts as an array
    ("triton", jnp.float32, {"bool"}),    # its backward expands them to a boolean [b, 1, L, L] mask
])
def test_gpu_kernels_hold_no_float_square_value(gpu_kernels_traceable, kernel, dtype, square_in_backward):
    t = 200
    q, k, v = (x.astype(dtype) for x in _qkv(2, t, 4, 2, 16))
    seg = _packed_segments(2, t)
    valid, ids = jnp.asarray(seg > 0), _ids(seg)
    fn = lambda q, k, v: flash_attention(q, k, v, ids, kernels=(kernel,))
    forward = jax.make_jaxpr(fn)(q, k, v)
    assert _has_kernel(forward)
    assert not _squares(forward, t)
    assert _square(fn, q, k, v, valid, t) == square_in_backward


@pytest.mark.slow  # ~10 s on 2 cores: outside the quick loop (pytest -m "not slow")
def test_auto_on_gpu_sends_packed_qwen2_to_tokamax_with_no_square_value(gpu_kernels_traceable, monkeypatch):
    """The packed Qwen2 loss and gradient as ``auto`` builds them on an sm90 GPU (bf16): Mosaic GPU
    kernels, and no ``[.., L, L]`` value anywhere (no mask, no scores)."""
    monkeypatch.setattr(attention.parallel, "current_platform", lambda: "gpu")
    t = 200  # neither it nor 256 (padded) appears in another dimension of the tiny model
    ids, mask, positions, seg = _packed_batch(t)

    params = Qwen2ForCausalLM(_tiny(attention_impl="xla")).init(jax.random.PRNGKey(0), ids[:, :8])["params"]

    def squares(impl):
        model = Qwen2ForCausalLM(_tiny(attention_impl=impl, dtype=jnp.bfloat16))
        loss = lambda p: model.apply({"params": p}, ids, mask, positions, segment_ids=seg)[0].astype(
            jnp.float32).sum()
        jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params)
        return _has_kernel(jaxpr), {a.shape for a in _squares(jaxpr, t)}

    assert attention.resolve_implementation("auto", jnp.bfloat16, 16, packed=True, cached=False) == "tokamax"
    assert squares("auto") == (True, set())
    kernel, xla = squares("xla")
    assert not kernel and xla  # the check can fail


@pytest.mark.slow  # ~10 s on 2 cores: outside the quick loop (pytest -m "not slow")
@pytest.mark.parametrize("remat", ["none", "dots_no_batch"])  # the stage configs' policy: the kernel under remat
def test_qwen2_tokamax_logits_and_gradients_match_xla_on_packed_batch(remat):
    ids, mask, positions, seg = _packed_batch()
    xla = Qwen2ForCausalLM(_tiny(attention_impl="xla", remat_policy=remat))
    params = xla.init(jax.random.PRNGKey(0), ids[:, :8])["params"]
    flash = Qwen2ForCausalLM(_tiny(attention_impl="tokamax", remat_policy=remat))
    valid = np.asarray(mask, bool)

    def run(model):
        def loss(p):
            logits, _ = model.apply({"params": p}, ids, mask, positions, segment_ids=seg)
            return jnp.sum(jnp.where(mask[..., None] > 0, jax.nn.log_softmax(logits), 0.0)), logits
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (ref_loss, ref), ref_grads = run(xla)
    (out_loss, out), grads = run(flash)
    assert rel_err(out[valid], ref[valid]) <= TOL
    assert rel_err(out_loss, ref_loss) <= TOL
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert rel_err(a, b) <= TOL


SHARDED = r"""
import os
os.environ["JAX_NUM_CPU_DEVICES"] = "4"
import jax, jax.numpy as jnp, numpy as np
from vita_jax import parallel
from vita_jax.layers.flash import flash_attention
ks = jax.random.split(jax.random.PRNGKey(0), 3)
seg = jnp.asarray(np.broadcast_to(np.arange(64) // 25, (4, 64)), jnp.int32)  # 3 segments per row
f = lambda q, k, v: flash_attention(q, k, v, seg, kernels=("xla_chunked",), chunk=(16, 16))
errs = []
for kv in (2, 1):  # kv heads split like the query heads; kv heads replicated (repeated before the kernel)
    q = jax.random.normal(ks[0], (4, 64, 4, 16))
    k, v = (jax.random.normal(x, (4, 64, kv, 16)) for x in ks[1:])
    ref = f(q, k, v)
    with parallel.use_mesh(parallel.make_mesh({"data": 2, "tensor": 2})):
        out = jax.jit(f)(q, k, v)
    errs.append(float(jnp.abs(out - ref).max() / jnp.abs(ref).max()))
print("ERRS", max(errs))
"""


@pytest.mark.slow  # 10-25 s on 2 cores: outside the quick loop (pytest -m "not slow")
def test_flash_under_a_mesh_shards_batch_and_heads():
    env = dict(os.environ)
    env["XLA_FLAGS"] = XLA_BASE  # the session's, without a device count of its own
    p = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=HANG_S)
    assert p.returncode == 0, p.stderr[-3000:]
    assert float(p.stdout.split("ERRS")[-1]) <= TOL
