"""The stage partitions and the train step: frozen parameters bitwise unchanged, no optimizer
state for them, no backward pass through a frozen tower, each stage's loss falls."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vita_jax.infer.speech import load_speech
from vita_jax.models import vita
from vita_jax.models.ctc import WhaleCTC
from vita_jax.train import setup, stages

VIT_TOKENS = 17     # 1 CLS + 4x4 patches: a dimension only ViT activations have in these batches
WHALE_FRAMES = 47   # encoder frames of the 192-frame audio bucket


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def lm_batch(model, tiny_dir):
    f = np.load(os.path.join(tiny_dir, "reference/forward.npz"))
    plan, args = model._prepare(f["input_ids"], f["attention_mask"], f["labels"], f["images"][:3], f["audio_feats"],
                                f["audio_lengths"])
    return dict(kind=args[0], text_ids=args[1], src=args[2], pixels=args[3], audio_feats=args[4], audio_lens=args[5],
                labels=jnp.asarray(plan.labels))


def _stage(model, stage):
    c = stages.stage_config(stage, "tiny")
    c.llm.update(model.config.llm.to_dict())
    c.vision.update(model.config.vision.to_dict())
    c.audio.update(model.config.audio.to_dict())
    c.mm_hidden_size = model.config.mm_hidden_size
    return c


def _ops_with_dim(jaxpr_text: str, dim: int) -> int:
    rx = re.compile(r"\[(?:\d+,)*%d(?:,\d+)*\]" % dim)
    return sum(1 for line in jaxpr_text.splitlines() if "=" in line and rx.search(line.split("=")[0]))


def _run(config, params, batch, steps):
    state, step, info = setup.build(config, params, total_steps=steps)
    frozen0 = {k: np.asarray(v) for k, v in state.frozen.items()}
    text = str(jax.make_jaxpr(step)(state, batch))
    losses = []
    for _ in range(steps):
        state, met = step(state, batch)
        losses.append(float(met["loss"]))
    return state, frozen0, text, losses, info


def _check_frozen_and_optimizer(state, frozen0):
    for k, v in state.frozen.items():
        assert np.array_equal(np.asarray(v), frozen0[k]), k
    keys = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        keys.update(k for k in (getattr(p, "key", None) for p in path)
                    if isinstance(k, str) and "/" in k and not k.startswith("train"))
    assert keys and keys <= set(state.train), keys - set(state.train)   # no state for any frozen leaf


@pytest.mark.parametrize("stage,vit_backward,whale_backward", [
    ("1.1", False, False), ("1.2", True, False), ("1.3", True, False), ("2.1b", False, False), ("2.2", False, False)])
@pytest.mark.slow  # a minute or more on 2 cores: outside the quick loop
def test_lm_stages(model, lm_batch, stage, vit_backward, whale_backward):
    c = _stage(model, stage)
    c.optim.update(lr=3e-3, schedule="constant")  # overfitting one batch, not the official schedule
    state, frozen0, text, losses, info = _run(c, model.params, lm_batch, 25)
    _check_frozen_and_optimizer(state, frozen0)
    fwd = str(jax.make_jaxpr(
        lambda p, x: model.module.apply({"params": p}, x, method=type(model.module).encode_images))(
        model.params, lm_batch["pixels"]))
    vit_fwd, vit_step = _ops_with_dim(fwd, VIT_TOKENS), _ops_with_dim(text, VIT_TOKENS)
    assert (vit_step > vit_fwd) == vit_backward, (vit_step, vit_fwd)
    afwd = str(jax.make_jaxpr(
        lambda p, f, n: model.module.apply({"params": p}, f, n, method=type(model.module).encode_audio))(
        model.params, lm_batch["audio_feats"], lm_batch["audio_lens"]))
    assert (_ops_with_dim(text, WHALE_FRAMES) > _ops_with_dim(afwd, WHALE_FRAMES)) == whale_backward
    assert losses[-1] < 0.6 * losses[0], losses  # overfits the batch (even the projector alone)
    assert "trainable" in info["table"]


@pytest.mark.slow  # a minute or more on 2 cores: outside the quick loop
def test_ctc_stage(model):
    from vita_jax import assets
    from vita_jax.data.stage_batches import ctc_batch
    from vita_jax.data.units import UnitVocab
    clips = assets.speech_clips()[2:5]
    vocab = UnitVocab.train([t for *_, t in clips])
    b = ctc_batch([w for _, w, _ in clips] + [clips[0][1]], [t for *_, t in clips] + [clips[0][2]], vocab)
    feats, lengths, labels, label_mask = b["feats"], b["lengths"], b["labels"], b["label_mask"]
    c = _stage(model, "2.1a")
    c.ctc_units = vocab.num_units
    import flax.linen as nn
    head = nn.unbox(WhaleCTC(vita.audio_config(c), vocab.num_units).init(
        jax.random.PRNGKey(0), feats[:1], lengths[:1])["params"]["ctc"])
    params = dict(model.params, ctc=jax.tree.map(jnp.asarray, dict(head)))
    batch = dict(feats=jnp.asarray(feats), lengths=jnp.asarray(lengths), labels=jnp.asarray(labels),
                 label_mask=jnp.asarray(label_mask))
    c.optim.update(lr=3e-3, schedule="constant")
    state, frozen0, _, losses, _ = _run(c, params, batch, 40)
    _check_frozen_and_optimizer(state, frozen0)
    assert "audio_encoder/encoder/cmvn_mean" in state.frozen and "llm/model/norm/weight" in state.frozen
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow  # 10-25 s on 2 cores: outside the quick loop (pytest -m "not slow")
def test_tts_stage(model, tiny_dir):
    s = load_speech(os.path.join(tiny_dir, "vita_tts_ckpt"))
    c = _stage(model, "3.2")
    c.tts = dict(idim=s.decoder_cfg.idim, odim=s.decoder_cfg.odim, attention_heads=s.decoder_cfg.attention_heads,
                 linear_units=s.decoder_cfg.linear_units, num_blocks=s.decoder_cfg.num_blocks)
    params = dict(model.params, tts_decoder=s.decoder_params)
    rng = np.random.default_rng(0)
    batch = dict(text_ids=jnp.asarray(rng.integers(30, 500, (2, 5)), jnp.int32), text_lens=jnp.asarray([5, 3]),
                 codes=jnp.asarray(np.where(np.arange(9)[None] < np.array([[9], [6]]), rng.integers(0, 64, (2, 9)), -1),
                                   jnp.int32), code_lens=jnp.asarray([9, 6]))
    c.optim.update(lr=3e-3, schedule="constant")
    state, frozen0, text, losses, _ = _run(c, params, batch, 30)
    _check_frozen_and_optimizer(state, frozen0)
    assert all(k.startswith("tts_decoder/") for k in state.train)
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow  # a minute or more on 2 cores: outside the quick loop
def test_grad_accumulation_equals_one_batch(model, tiny_dir):
    f = np.load(os.path.join(tiny_dir, "reference/forward.npz"))
    ids, mask, lab = f["input_ids"][:1], f["attention_mask"][:1], f["labels"][:1]
    tiles, feats, lens = f["images"][:3], f["audio_feats"][:1], f["audio_lengths"][:1]

    def batch(n):
        plan, a = model._prepare(np.repeat(ids, n, 0), np.repeat(mask, n, 0), np.repeat(lab, n, 0),
                                 np.concatenate([tiles] * n), np.concatenate([feats] * n), np.concatenate([lens] * n))
        return dict(kind=a[0], text_ids=a[1], src=a[2], pixels=a[3], audio_feats=a[4], audio_lens=a[5],
                    labels=jnp.asarray(plan.labels))
    whole, micro = batch(2), batch(1)
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), micro)
    c = _stage(model, "1.2")
    s1, step1, _ = setup.build(c, model.params, total_steps=10)
    c.grad_accum = 2
    s2, step2, _ = setup.build(c, model.params, total_steps=10)
    s1, m1 = step1(s1, whole)
    s2, m2 = step2(s2, stacked)
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-6 * abs(float(m1["loss"]))
    assert int(m1["tokens"]) == int(m2["tokens"])
    for k in s1.train:
        np.testing.assert_allclose(np.asarray(s1.train[k]), np.asarray(s2.train[k]), rtol=1e-5, atol=1e-6)


def test_nonfinite_step_skipped(model, lm_batch):
    c = _stage(model, "1.1")
    state, step, _ = setup.build(c, model.params, total_steps=10)
    before = {k: np.asarray(v) for k, v in state.train.items()}
    bad = dict(lm_batch, pixels=lm_batch["pixels"] * jnp.nan)
    state, met = step(state, bad)
    assert not bool(met["finite"]) and int(state.nonfinite) == 1
    for k, v in state.train.items():
        np.testing.assert_array_equal(np.asarray(v), before[k])
