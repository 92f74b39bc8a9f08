"""The speech decoder as an engine (vita_jax/infer/speech_engine.py, speech_scheduler.py): the official
codes from rows batched in slots, sampling on the device, no compilation after warm-up."""
import os
import threading

import numpy as np
import pytest

from vita_jax.infer.speech_engine import DecodeSlots, SlotOptions

pytestmark = pytest.mark.slow  # compiles for minutes in all: outside the quick loop (pytest -m "not slow")

VARIANT = os.path.join(os.path.dirname(__file__), "data", "tts_variant")


@pytest.fixture(scope="module")
def variant():
    from vita_jax.convert.tts import load_decoder
    from vita_jax.infer.speech import SpeechModel
    cfg, params = load_decoder(os.path.join(VARIANT, "decoder"))
    return SpeechModel(cfg, params), np.load(os.path.join(VARIANT, "reference.npz"))


@pytest.fixture(scope="module")
def slots(variant):
    s = DecodeSlots(variant[0], slots=3, steps=8, max_input=64, max_tokens=40, window=8)
    s.warmup()
    return s


def _opts(ref, mode, **kw):
    k, window, penalty, _ = ref[f"{mode}.settings"]
    return SlotOptions(top_k=int(k), penalty_window=int(window), penalty=float(penalty), **{"max_tokens": 40, **kw})


def _run(s, jobs, late=None):
    """``jobs`` {slot: (x, opts)} joined at once (``late``: joined after the first dispatch); codes per slot."""
    out = {slot: [] for slot in {**jobs, **(late or {})}}
    for slot, (x, o) in jobs.items():
        s.join(slot, x, o)
    first = True
    while True:
        codes, active = s.decode()
        for slot in out:
            out[slot] += [int(c) for c in codes[slot] if c >= 0]
        if first and late:
            for slot, (x, o) in late.items():
                s.join(slot, x, o)
            first, active = False, np.ones(1, bool)
        if not active.any():
            return out


def test_distribution_is_the_official_rule(slots):
    """Penalty (a window over [SOS] + codes, duplicates divided again), softmax, top-k, renormalised:
    the host rule (models/tts_decoder.sampling_distribution, checked against the official probabilities)
    within float32 rounding, per row with its own settings."""
    import jax.numpy as jnp

    from vita_jax.models import tts_decoder as dec
    rng = np.random.default_rng(0)
    v = slots.cfg.odim + 4
    logits = rng.normal(0, 3, (3, v)).astype(np.float32)
    hist = np.full((3, slots.window), -1, np.int32)
    hist[0, -4:] = [slots.cfg.sos, 5, 5, 7]     # a duplicate: divided twice
    hist[1, -2:] = [slots.cfg.sos, 3]
    hist[2, :] = rng.integers(0, v, slots.window)
    state = dict(slots.state, hist=jnp.asarray(hist), produced=jnp.asarray([3, 1, 20], jnp.int32),
                 window=jnp.asarray([5, 0, 8], jnp.int32), top_k=jnp.asarray([2, 1, 3], jnp.int32),
                 penalty=jnp.asarray([1.1, 1.1, 1.3], jnp.float32))
    got = np.asarray(slots._distribution(state, jnp.asarray(logits)))
    for r, (window, k, pen) in enumerate([(5, 2, 1.1), (0, 1, 1.1), (8, 3, 1.3)]):
        history = [int(t) for t in hist[r] if t >= 0]
        want = dec.sampling_distribution(logits[r], k, history, window if window > 0 else -1, pen)
        assert (got[r] > 0).sum() == k and np.array_equal(got[r] > 0, want > 0), r
        np.testing.assert_allclose(got[r], want, rtol=1e-6, atol=1e-7)


def test_greedy_and_penalty_codes_are_the_official(variant, slots):
    """The official ids in both deterministic modes, BOS drawn mid-reply included (penalty mode)."""
    speech, ref = variant
    for mode in ("greedy", "penalty"):
        got = _run(slots, {1: (ref["hidden"], _opts(ref, mode))})[1]
        assert got == ref[f"{mode}.tokens"].tolist(), mode
    assert speech.decoder_cfg.odim in ref["penalty.tokens"]


def test_rows_together_equal_rows_alone(variant, slots):
    """Three rows of other lengths and modes, one joining a dispatch later: each row's codes are what it
    gives alone (greedy: the host decoder's); a seed's sampled codes do not depend on the dispatch size
    or on the other rows; another seed draws others."""
    speech, ref = variant
    h = ref["hidden"]
    jobs = {0: (h[:7], _opts(ref, "greedy")), 1: (h, _opts(ref, "topk3_penalty", seed=3))}
    late = {2: (h[2:], _opts(ref, "topk2", seed=11))}
    together = _run(slots, jobs, late)
    for slot, (x, o) in {**jobs, **late}.items():
        assert together[slot] == _run(slots, {2 - slot: (x, o)})[2 - slot], slot
    host = speech.generate_codes(h[:7], top_k=1, max_tokens=40)
    assert together[0] == host.tolist()
    other = DecodeSlots(speech, slots=1, steps=3, max_input=64, max_tokens=40, window=8)
    assert _run(other, {0: (h, _opts(ref, "topk3_penalty", seed=3))})[0] == together[1]
    assert _run(other, {0: (h, _opts(ref, "topk3_penalty", seed=4))})[0] != together[1]
    assert len(together[1]) > 5


def test_nothing_compiles_after_warmup(variant, slots):
    """Joins of every length of the ladder, leaves and dispatches reuse the warm-up's programs."""
    _, ref = variant
    before = slots.compiled()
    assert before == {"join": len(slots.ladder), "leave": 1, "decode": 1}
    for n in (1, 9, 31, 33, 64):
        slots.join(n % 3, np.resize(ref["hidden"], (n, ref["hidden"].shape[1])), SlotOptions(max_tokens=3, seed=n))
        slots.decode()
        slots.leave(n % 3)
    assert slots.compiled() == before
    with pytest.raises(ValueError, match="longer than the engine's max_input 64"):
        slots.join(0, np.zeros((65, ref["hidden"].shape[1]), np.float32), SlotOptions(max_tokens=3))
    with pytest.raises(ValueError, match="max_tokens must be in 1..40"):
        slots.join(0, ref["hidden"], SlotOptions(max_tokens=41))


def test_scheduler_batches_callers_and_cancels(variant):
    """Four callers on threads: each gets its codes alone-equal, the engine ran several rows per dispatch;
    a cancelled request ends between two dispatches and frees its slot; bad input is the caller's error."""
    from vita_jax.infer.speech_scheduler import SpeechScheduler
    speech, ref = variant
    h = ref["hidden"]
    sched = SpeechScheduler(speech, slots=4, steps=4, max_input=64, max_tokens=40, window=8)
    try:
        # rows of 37-40 codes (greedy and penalty modes, sampled top-2 seeds): long enough to share dispatches
        reqs = [(h, _opts(ref, "greedy")), (h, _opts(ref, "penalty")), (h[1:], _opts(ref, "topk2", seed=2)),
                (h, _opts(ref, "greedy", max_tokens=30))]
        want = [list(sched.submit(x, o)) for x, o in reqs]  # one at a time
        got, go = [None] * 4, threading.Barrier(4)

        def call(i):
            go.wait()
            got[i] = list(sched.submit(*reqs[i]))
        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == want
        d0, r0 = sched.dispatches, sched.rows_dispatched
        streams = [sched.submit(x, o) for x, o in reqs]  # queued together: they share the dispatches
        assert [list(st) for st in streams] == want
        assert (sched.rows_dispatched - r0) / (sched.dispatches - d0) >= 2, [len(w) for w in want]
        stream = sched.submit(h, SlotOptions(top_k=1, max_tokens=40))
        it = iter(stream)
        first = [next(it) for _ in range(3)]
        stream.cancel()
        rest = list(it)
        assert first and len(first) + len(rest) < 40 and not sched._rows  # stopped early, slot free
        assert sched.stats()["compiles_after_warmup"] == 0
        with pytest.raises(ValueError, match=r"must be \[n >= 1, 24\]"):
            sched.submit(np.zeros((3, 7), np.float32))
        with pytest.raises(ValueError, match="max_input"):
            sched.submit(np.zeros((99, 24), np.float32))
    finally:
        sched.close()


def test_stream_takes_an_engine_stream(speech, tts_dir):
    """SpeechModel.stream over a CodeStream = stream over the same codes given as a list (the fixture
    release's decoder and codec)."""
    from vita_jax.infer.speech_scheduler import SpeechScheduler

    from conftest import tts_ref
    g = tts_ref(tts_dir, "decoder_infer_greedy")
    sched = SpeechScheduler(speech, slots=2, steps=6, max_input=64, max_tokens=40, window=8)
    try:
        codes = list(sched.submit(g["hidden"], SlotOptions(top_k=1, max_tokens=40)))
        assert codes == g["tokens"].tolist()
        a = list(speech.stream(sched.submit(g["hidden"], SlotOptions(top_k=1, max_tokens=40)), chunk_size=8,
                               padding_size=2))
        b = list(speech.stream(np.asarray(codes), chunk_size=8, padding_size=2))
        assert len(a) == len(b) >= 1 and all(np.array_equal(x, y) for x, y in zip(a, b))
    finally:
        sched.close()
