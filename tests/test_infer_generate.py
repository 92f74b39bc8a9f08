"""Cached decoding against repeated full forward passes and transformers' greedy generate; sampling settings
and ids are checked, naming the field."""
import numpy as np
import pytest
import torch

import vita_jax
from vita_jax.infer import generate as gen

NEW = 16


@pytest.fixture(scope="module")
def setup(hf_qwen2):
    model, path = hf_qwen2
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, 256, 9), rng.integers(1, 256, 5)]
    return model, vita_jax.from_pretrained(path), prompts


def _pad(prompts, side):
    L = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), L), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        sl = slice(L - len(p), L) if side == "left" else slice(0, len(p))
        ids[i, sl], mask[i, sl] = p, 1
    return ids, mask


def _greedy_by_full_forward(m, prompt):
    seq = list(prompt)
    for _ in range(NEW):
        seq.append(int(np.argmax(m.forward(np.asarray([seq]))[0, -1])))
    return np.asarray(seq[len(prompt):])


def test_cache_equals_full_forward_and_transformers(setup):
    model, m, prompts = setup
    ids, mask = _pad(prompts, "left")
    ours_left = m.generate(ids, attention_mask=mask, max_new_tokens=NEW, stop_ids=[])
    ours_right = m.generate(*_pad(prompts, "right")[:1], attention_mask=_pad(prompts, "right")[1],
                            max_new_tokens=NEW, stop_ids=[])
    assert ours_left.shape == (2, NEW)
    np.testing.assert_array_equal(ours_left, ours_right)
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(ours_left[i], _greedy_by_full_forward(m, p))
    with torch.no_grad():
        hf = model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                            max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(ours_left, hf[:, ids.shape[1]:].numpy())
    # the two rows really differ (a batch bug that copies one row would pass otherwise)
    assert not np.array_equal(ours_left[0], ours_left[1])


def test_stop_token_and_padding(setup):
    _, m, prompts = setup
    free = m.generate(np.asarray([prompts[0]]), max_new_tokens=NEW, stop_ids=[])
    stop = int(free[0, 3])
    first = int(np.argmax(free[0] == stop))
    out = m.generate(np.asarray([prompts[0]]), max_new_tokens=NEW, stop_ids=[stop])
    assert out.shape[1] == first + 1  # ended early, stop token kept
    np.testing.assert_array_equal(out[0], free[0, :first + 1])


@pytest.mark.slow  # 10-25 s on 2 cores: outside the quick loop (pytest -m "not slow")
def test_sampling_is_seeded_and_respects_top_k(setup):
    _, m, prompts = setup
    ids = np.asarray([prompts[0]])
    a = m.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.0, seed=1, stop_ids=[])
    b = m.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.0, seed=1, stop_ids=[])
    c = m.generate(ids, max_new_tokens=8, do_sample=True, temperature=1.0, seed=2, stop_ids=[])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = m.generate(ids, max_new_tokens=8, stop_ids=[])
    np.testing.assert_array_equal(m.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, seed=3,
                                             stop_ids=[]), greedy)
    np.testing.assert_array_equal(m.generate(ids, max_new_tokens=8, do_sample=True, top_p=1e-6, seed=4,
                                             stop_ids=[]), greedy)


def test_vocab_limit(setup):
    _, m, prompts = setup
    out = m.generate(np.asarray([prompts[0]]), max_new_tokens=8, stop_ids=[], vocab_limit=10)
    assert (out < 10).all()


# --------------------------------------------- refused early, nothing lost (slow, as the old test_hardening.py was)


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
def test_greedy_ignores_temperature_zero():
    gen.check_sampling(8, do_sample=False, temperature=0.0, top_k=0, top_p=1.0)  # greedy: temperature unused
    gen.check_sampling(1, do_sample=True, temperature=0.7, top_k=0, top_p=1.0)   # top_k 0 = off


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
@pytest.mark.parametrize("field, kw", [("top_p", dict(top_p=0.0)), ("top_k", dict(top_k=-2)),
                                       ("temperature", dict(temperature=0.0)),
                                       ("max_new_tokens", dict(max_new_tokens=0))])
def test_library_names_the_field(tiny_model, field, kw):
    sampling = dict(max_new_tokens=2, do_sample=True, temperature=1.0, top_k=0, top_p=1.0) | kw
    with pytest.raises(ValueError, match=field):
        tiny_model.generate(np.asarray([[1, 2, 3]]), **sampling)
    with pytest.raises(ValueError, match=field):
        tiny_model.chat("hi", **sampling)


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
def test_top_p_tiny_keeps_the_top_token():
    """Even a top_p below every probability keeps the most likely token (never all masked -> id 0)."""
    import jax
    logits = np.asarray([[0.0, 1.0, 5.0, 2.0], [3.0, 0.0, 0.0, 9.0]], np.float32)
    for seed in range(5):
        ids = gen.sample_logits(logits, jax.random.PRNGKey(seed), True, 1.0, 0, 1e-9)
        assert list(np.asarray(ids)) == [2, 3]


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
def test_top_k_over_the_vocabulary_is_no_filter():
    import jax
    logits = np.asarray([[0.0, 1.0, 5.0, 2.0]], np.float32)
    key = jax.random.PRNGKey(0)
    assert np.array_equal(gen.sample_logits(logits, key, True, 1.0, 10 ** 8, 1.0),
                          gen.sample_logits(logits, key, True, 1.0, 0, 1.0))


# ---------------------------------------------------------- refused early, one line naming the file, field or option


@pytest.mark.parametrize("ids", [np.zeros((1, 0), np.int64), np.asarray([[1.5, 2.0]]), [[True, False]]])
def test_generate_needs_integer_ids(tiny_model, ids):
    with pytest.raises(ValueError, match="input_ids: expected a non-empty array of integer ids"):
        tiny_model.generate(ids, max_new_tokens=2)
