"""Gradient accumulation over micro-batches of any structure: packed micro-batches (lists of clip
groups) from the real pipeline stack leaf by leaf, and a ``grad_accum = 2`` step equals the same
micro-batches computed one by one; ``vita-jax compile``'s abstract batch has the trainer's structure."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vita_jax.data import pipeline
from vita_jax.data.text import TextTokenizer
from vita_jax.train import compile as compile_lib
from vita_jax.train import program, setup, stages, trainer
from vita_jax.train import step as step_lib

from conftest import demo_mixture


@pytest.fixture(scope="module")
def packed_config(tmp_path_factory):
    """Stage 2.2 (tiny model) on official files of images, spoken questions and text: packed rows,
    budgets sized from the data, two micro-batches a step."""
    root = tmp_path_factory.mktemp("accum_data")
    files, tok, vocab = demo_mixture(root, 16, n_text=8)
    c = stages.stage_config("2.2", "tiny")
    c.llm.vocab_size = vocab
    c.data.update(tokenizer=tok, mixture=[{"json": f} for f in files], packing=True, budgets="auto",
                  calibration_examples=40, seq_len=384, max_frames=800, max_tiles_per_sample=6,
                  workers=0)
    c.update(batch_size=8, grad_accum=2)
    return c


@pytest.mark.slow  # a minute or more on 2 cores: outside the quick loop
def test_packed_micro_batches_accumulate_as_one_by_one(packed_config):
    c = packed_config
    tok = TextTokenizer.from_file(c.data.tokenizer)
    data = pipeline.official_data(c, tok)
    batch = trainer.next_batch(data, 2)
    again = pipeline.official_data(c, tok)
    mbs = [next(again), next(again)]  # the same two micro-batches (the stream is deterministic)
    groups = batch["audio_feats"]
    assert isinstance(groups, list) and len(groups) >= 2, "several clip groups expected"
    assert all(g.shape[0] == 2 for g in groups) and batch["pixels"].shape[0] == 2
    for k, g in enumerate(groups):
        np.testing.assert_array_equal(g[1], mbs[1]["audio_feats"][k])
    assert all(int((mb["kind"] == 2).sum()) and int((mb["kind"] == 1).sum()) for mb in mbs)  # speech and images

    params = program.initial_params(c)
    state, step, _ = setup.build(c, params)
    _, met = step(state, jax.tree.map(jnp.asarray, batch))

    # one by one: each micro-batch's summed loss, token count, correct count and gradient
    lab = stages.labels(params, c.trainable, c.optim.group_lrs)
    train, frozen = stages.split(params, lab)
    loss_fn = step_lib.make_loss(c)
    grad_fn = jax.jit(jax.value_and_grad(lambda t, mb: loss_fn(stages.merge(t, frozen), mb), has_aux=True))
    total = count = correct = 0.0
    grads = None
    for mb in mbs:
        (t, (n, k)), g = grad_fn(train, jax.tree.map(jnp.asarray, mb))
        total, count, correct = total + float(t), count + int(n), correct + int(k)
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    assert count > 0 and int(met["tokens"]) == count
    np.testing.assert_allclose(float(met["loss"]), total / count, rtol=1e-6)
    np.testing.assert_allclose(float(met["accuracy"]), correct / count, rtol=1e-6)
    gnorm = float(jnp.sqrt(sum(jnp.sum((x / count) ** 2) for x in jax.tree.leaves(grads))))
    np.testing.assert_allclose(float(met["grad_norm"]), gnorm, rtol=1e-5)


def test_stacking_keeps_structure_and_names_a_mismatch():
    a = dict(x=np.zeros((2, 3)), groups=[np.zeros((1, 4)), np.ones((2, 8))], none=None)
    b = dict(x=np.ones((2, 3)), groups=[np.ones((1, 4)), np.zeros((2, 8))], none=None)
    s = pipeline.stack_micro_batches([a, b])
    assert s["x"].shape == (2, 2, 3) and [g.shape for g in s["groups"]] == [(2, 1, 4), (2, 2, 8)]
    assert s["none"] is None and s["groups"][0][1].sum() == 4
    with pytest.raises(ValueError, match=r"shape of \['groups'\]\[1\]"):
        pipeline.stack_micro_batches([a, dict(b, groups=[np.ones((1, 4)), np.zeros((3, 8))])])
    with pytest.raises(ValueError, match="number of"):
        pipeline.stack_micro_batches([a, dict(b, groups=[np.ones((1, 4))])])
    abstract = pipeline.stack_micro_batches([jax.ShapeDtypeStruct((3, 5), np.int8)] * 2)
    assert abstract.shape == (2, 3, 5) and abstract.dtype == np.int8


def test_compile_batch_has_the_trainers_structure():
    """The AOT batch of a packed stage: clip groups as lists (as the packer gives them), every leaf
    with the micro-batch axis first."""
    c = stages.stage_config("2.2", "tiny")
    c.data.update(packing=True)
    c.update(batch_size=4, grad_accum=2)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    b = compile_lib.abstract_batch(c, mesh, rows=2)
    assert isinstance(b["audio_feats"], list) and isinstance(b["audio_lens"], list)
    assert all(x.shape[0] == 2 for x in jax.tree.leaves(b))
    assert b["kind"].shape == (2, 2, c.data.seq_len)
