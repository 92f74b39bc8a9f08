"""Stage 2.1(a): CTC head, unit vocabulary, and a tiny encoder overfitting real speech."""
import numpy as np

from vita_jax import assets
from vita_jax.data.units import UnitVocab, cer, normalize
from vita_jax.models import ctc
from vita_jax.train.ctc import tiny_config, train_ctc


def test_units_and_cer():
    v = UnitVocab.train(["He turned sharply.", "And you always want to see it"])
    ids = v.encode("he turned")
    assert min(ids) >= 1 and v.decode(ids) == "he turned"
    assert normalize("He, turned!  sharply") == "he turned sharply"
    assert cer(["abcd"], ["abxd"]) == 0.25 and cer(["ab"], ["ab"]) == 0.0


def test_greedy_decode_merges_and_drops_blanks():
    logits = np.full((1, 7, 4), -5.0, np.float32)
    for t, k in enumerate([1, 1, 0, 1, 2, 2, 3]):
        logits[0, t, k] = 5.0
    assert ctc.greedy_decode(logits, [7]) == [[1, 1, 2, 3]]
    assert ctc.greedy_decode(logits, [3]) == [[1]]


def test_overfits_real_clips():
    clips = assets.speech_clips()
    assert len(clips) == 6
    r = train_ctc([w for _, w, _ in clips], [t for _, _, t in clips], tiny_config(), steps=100, lr=2e-3)
    losses = r["losses"]
    assert losses[-1] < 0.05 * losses[0]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert r["cer"] <= 0.05, list(zip(r["refs"], r["hyps"]))
