"""The speech decoder's memory-lean training forward (layers/chunked.py): the mask as a rule, queries in blocks under
``jax.checkpoint``, and per-layer remat. Against the official teacher-forced logits / loss of the fixture, and against
the dense path's gradients; the rule equals the mask the official code builds; no ``[T, T]`` value in its jaxpr."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vita_jax.layers.chunked import PrefixLMMask, chunked_attention
from vita_jax.models import tts_decoder as dec

from conftest import jaxpr_avals, rel_err, tts_ref


def official_mask(x_lens, lx, y_lens, ly):
    """The mask of the official ``LLM2TTSCodecAR.forward`` written out with numpy loops (independent of the rule)."""
    lt, t = 1 + lx, 1 + lx + ly + 1
    out = np.zeros((len(x_lens), 1, t, t), bool)
    for b, (xl, yl) in enumerate(zip(x_lens, y_lens)):
        text = 1 + xl
        out[b, 0, :text, :text] = True
        for r in range(lt, lt + yl + 1):
            out[b, 0, r, :text] = True
            out[b, 0, r, lt:r + 1] = True
    return out


def test_rule_is_the_official_mask():
    x_lens, y_lens, lx, ly = np.array([5, 9, 0]), np.array([3, 0, 6]), 9, 6
    lt, t = 1 + lx, 1 + lx + ly + 1
    rule = PrefixLMMask(jnp.asarray(1 + x_lens), jnp.int32(lt), jnp.asarray(lt + y_lens + 1))
    np.testing.assert_array_equal(np.asarray(rule.dense(t)), official_mask(x_lens, lx, y_lens, ly))


@pytest.mark.parametrize("chunk", [4, 7, 64])  # blocks that divide the rows, that do not, and one block
def test_chunked_equals_dense_attention(chunk):
    """Values and gradients, grouped-query heads, a row whose text padding sees nothing (same uniform average)."""
    b, t, h, kh, d = 2, 19, 4, 2, 8
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, d)), jnp.float32) for n in (h, kh, kh))
    rule = PrefixLMMask(jnp.array([4, 7]), jnp.int32(8), jnp.array([13, 19]))

    def dense(q, k, v):
        kk, vv = (jnp.repeat(a, h // kh, axis=2) for a in (k, v))
        return jax.nn.dot_product_attention(q, kk, vv, mask=rule.dense(t), implementation="xla")

    def lean(q, k, v):
        return chunked_attention(q, k, v, rule, chunk=chunk)

    assert rel_err(lean(q, k, v), dense(q, k, v)) <= 1e-6
    w = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    g_lean = jax.grad(lambda *a: jnp.sum(lean(*a) * w), argnums=(0, 1, 2))(q, k, v)
    g_dense = jax.grad(lambda *a: jnp.sum(dense(*a) * w), argnums=(0, 1, 2))(q, k, v)
    for a, r in zip(g_lean, g_dense):
        assert rel_err(a, r) <= 1e-6


def _lean(cfg, chunk=512):
    return dataclasses.replace(cfg, attention_impl="chunked", remat_policy="full", attention_chunk=chunk)


@pytest.mark.slow  # ~25 s: three programs of the fixture decoder compiled
def test_decoder_lean_matches_the_official_forward(speech, tts_dir):
    """The fixture's teacher-forced logits and loss (tolerance of test_models_tts_decoder) with the lean settings,
    and the parameter gradient of the summed CE equal to the dense path's."""
    r = tts_ref(tts_dir, "decoder_train")
    args = (jnp.asarray(r["x"], jnp.float32), jnp.asarray(r["x_lens"], jnp.int32), jnp.asarray(r["y"], jnp.int32),
            jnp.asarray(r["y_lens"], jnp.int32))
    dense_m, lean_m = dec.TTSDecoder(speech.decoder_cfg), dec.TTSDecoder(_lean(speech.decoder_cfg, chunk=8))
    p = {"params": speech.decoder_params}
    logits, loss, _ = jax.jit(lean_m.apply)(p, *args)
    v = r["valid"]
    assert rel_err(np.asarray(logits)[v], r["logits"][v]) <= 1e-5
    assert abs(float(loss) - float(r["loss"])) / float(r["loss"]) <= 1e-5
    g_lean = jax.jit(jax.grad(lambda p: lean_m.apply(p, *args)[1]))(p)
    g_dense = jax.jit(jax.grad(lambda p: dense_m.apply(p, *args)[1]))(p)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_lean), jax.tree_util.tree_leaves(g_dense)):
        assert rel_err(a, b) <= 1e-5, jax.tree_util.keystr(path)


def test_lean_forward_keeps_no_square_value():
    """The training gradient's jaxpr at T = 1 + 4·40 + 80 + 1 = 242 positions holds no [.., 242, 242] value with the
    lean settings (it does with the dense mask: the check can fail)."""
    cfg = dec.TTSDecoderConfig(idim=32, odim=16, attention_heads=4, linear_units=64, num_blocks=2)
    b, lx, ly = 2, 160, 80
    args = (jnp.zeros((b, lx, 32)), jnp.array([lx, 100]), jnp.zeros((b, ly), jnp.int32), jnp.array([ly, 30]))

    def shapes(c):
        m = dec.TTSDecoder(c)
        p = jax.eval_shape(m.init, jax.random.PRNGKey(0), *args)
        grad = jax.grad(lambda p: m.apply(p, *args)[1])
        return {tuple(a.shape) for a in jaxpr_avals(jax.make_jaxpr(grad)(p))}

    t = 1 + lx + ly + 1
    assert any(s[-2:] == (t, t) for s in shapes(cfg))
    assert not any(s[-2:] == (t, t) for s in shapes(_lean(cfg, chunk=64)))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="tts.attention_impl"):
        dec.TTSDecoderConfig(attention_impl="flash")
    with pytest.raises(ValueError, match="remat_policy"):
        dec.TTSDecoderConfig(remat_policy="some")
