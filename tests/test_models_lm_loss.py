"""The chunked LM loss (vita_jax.models.lm_loss): loss, target counts, argmax hits and gradients
equal the dense loss's (the pre-chunking code, kept below as the reference), and the jitted train
step holds no ``[..., L, vocab]`` value."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vita_jax.models import vita
from vita_jax.models.vita import IGNORE_INDEX, TEXT
from vita_jax.train import setup, stages

from conftest import jaxpr_avals, rel_err


def dense_row_terms(logits, labels):
    """The loss as it was before chunking: full ``[rows, L, vocab]`` log-probabilities in float32."""
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    hits = (jnp.argmax(logits, -1) == targets) & valid
    return jnp.sum(jnp.where(valid, nll, 0.0), 1), jnp.sum(valid, 1), jnp.sum(hits, 1)


def _compare(module, params, labels, args, chunks):
    """Chunked (each of ``chunks``) against dense: per-row terms and every gradient leaf."""
    def dense(p):
        n, c, h = dense_row_terms(module.apply({"params": p}, *args), labels)
        return jnp.sum(n), (n, c, h)

    def chunked(p, chunk):
        n, c, h = vita.lm_row_terms(module.clone(loss_chunk=chunk), p, labels, *args)
        return jnp.sum(n), (n, c, h)

    (_, ref), g_ref = jax.jit(jax.value_and_grad(dense, has_aux=True))(params)
    assert int(ref[2].sum()) > 0 and int(ref[1].sum()) > int(ref[2].sum())  # some hits, some misses
    for chunk in chunks:
        (_, got), g = jax.jit(jax.value_and_grad(chunked, has_aux=True), static_argnums=1)(params, chunk)
        assert rel_err(got[0], ref[0]) <= 1e-6, chunk
        np.testing.assert_array_equal(got[1], ref[1])
        np.testing.assert_array_equal(got[2], ref[2])
        flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])  # noqa: E731
        assert rel_err(flat(g), flat(g_ref)) <= 1e-6, chunk
        scale = np.abs(flat(g_ref)).max()
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g)[0], jax.tree.leaves(g_ref)):
            # leaf by leaf too, except where the exact gradient is zero and both hold rounding noise
            # (the key projection's bias: softmax ignores a shift of every score)
            if np.abs(np.asarray(b)).max() > 1e-4 * scale:
                assert rel_err(a, b) <= 1e-6, (chunk, jax.tree_util.keystr(path))


def _with_hits(module, params, labels, args):
    """``labels`` with every other supervised target replaced by the model's own argmax, so the
    accuracy counts are not trivially zero."""
    pred = np.asarray(jnp.argmax(module.apply({"params": params}, *args), -1))
    lab = np.array(labels)
    rows, cols = np.nonzero(lab[:, 1:] != IGNORE_INDEX)
    keep = slice(None, None, 2)
    lab[rows[keep], cols[keep] + 1] = pred[rows[keep], cols[keep]]
    return jnp.asarray(lab)


@pytest.mark.slow  # a minute or more on 2 cores: outside the quick loop
def test_fixture_model_chunked_equals_dense(tiny_model, tiny_dir):
    m = tiny_model
    f = np.load(os.path.join(tiny_dir, "reference/forward.npz"))
    plan, args = m._prepare(f["input_ids"], f["attention_mask"], f["labels"], f["images"][:3], f["audio_feats"],
                            f["audio_lengths"])
    labels = _with_hits(m.module, m.params, plan.labels, args)
    assert labels.shape[1] > 16  # the chunks below cut the sequence (with a padded last chunk)
    _compare(m.module, m.params, labels, args, chunks=(16,))  # 63 targets: 4 chunks, the last one padded


def _text_batch(rows, length, vocab, seed=0):
    """A text-only spliced batch: random ids, a prompt of ignored labels then supervised targets."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, length)).astype(np.int32)
    labels = np.where(np.arange(length)[None] >= rng.integers(length // 4, length // 2, (rows, 1)), ids, IGNORE_INDEX)
    kind = np.full((rows, length), TEXT, np.int32)
    return dict(kind=jnp.asarray(kind), text_ids=jnp.asarray(ids), src=jnp.zeros((rows, length), jnp.int32),
                labels=jnp.asarray(labels))


def _tiny_config(vocab, tie=False, chunk=64):
    c = stages.stage_config("2.2", "tiny")
    c.has_vision = c.has_audio = False
    c.llm.update(vocab_size=vocab, tie_word_embeddings=tie)
    c.loss_chunk = chunk
    return c


@pytest.mark.slow  # 10-25 s on 2 cores: outside the quick loop (pytest -m "not slow")
@pytest.mark.parametrize("tie,chunk", [(False, 33), (True, 64)])  # 99 targets: 3 whole chunks / 2, one padded
def test_tiny_config_chunked_equals_dense(tie, chunk):
    c = _tiny_config(vocab=512, tie=tie)
    module = vita.VITA.from_config(c)
    assert module.loss_chunk == 64
    params = vita.init_params(c)
    assert ("lm_head" in params["llm"]) != tie
    b = _text_batch(3, 100, 512)
    args = (b["kind"], b["text_ids"], b["src"])
    labels = _with_hits(module, params, b["labels"], args)
    _compare(module, params, labels, args, chunks=(chunk,))


def _full_logits(step, state, batch, length, vocab, most) -> list:
    """Shapes of the step's values that hold the whole sequence's logits: ``[..., L (or L - 1), vocab]``,
    or over ``most`` entries along a vocab axis (the chunks' logits stacked, e.g. as saved residuals)."""
    avals = [a for a in jaxpr_avals(jax.make_jaxpr(step)(state, batch)) if getattr(a, "shape", ())]
    return [a.shape for a in avals if a.shape[-2:] in ((length, vocab), (length - 1, vocab))
            or (a.shape[-1] == vocab and np.prod(a.shape) > most)]


@pytest.mark.parametrize("accum", [1, 2])
def test_step_holds_no_full_logits(accum):
    # L and vocab appear in no other dimension of this model (hidden 64, MLP 128, heads 4 / 2 of 16, 2 layers)
    length, vocab, rows = 200, 1000, 3
    c = _tiny_config(vocab)
    c.grad_accum = accum
    params = vita.init_params(c)
    batch = _text_batch(rows, length, vocab)
    if accum > 1:
        batch = jax.tree.map(lambda x: jnp.stack([x] * accum), batch)
    state, step, _ = setup.build(c, params, total_steps=2)
    most = rows * c.loss_chunk * vocab  # one chunk's logits
    assert _full_logits(step, state, batch, length, vocab, most) == []
    # the check can fail: with the whole sequence as one chunk (the dense loss) the full logits are there
    c.loss_chunk = 0
    state, step, _ = setup.build(c, params, total_steps=2)
    assert (rows, length - 1, vocab) in _full_logits(step, state, batch, length, vocab, most)
