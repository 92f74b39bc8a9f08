"""Stage 2.1(a): CTC head, unit vocabulary, and a tiny encoder overfitting real speech."""
import json

import numpy as np
import pytest

import vita_jax
from vita_jax import assets
from vita_jax.data import audio as A
from vita_jax.data import pipeline
from vita_jax.data.stage_batches import ctc_batch
from vita_jax.data.units import UnitVocab, cer, normalize
from vita_jax.models import ctc, vita
from vita_jax.train import stages, trainer

pytestmark = pytest.mark.slow  # minutes: outside the quick loop (pytest -m "not slow")


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


def test_trainer_overfits_real_clips(tmp_path):
    """Stage 2.1a runs in the trainer (there is no separate CTC loop): a small encoder + CTC head
    overfits the bundled real clips, from global CMVN statistics of those clips."""
    clips = assets.speech_clips()
    assert len(clips) == 6
    waves, texts = [w for _, w, _ in clips], [t for *_, t in clips]
    c = stages.stage_config("2.1a", "tiny")
    c.audio.update(attention_dim=96, attention_heads=4, linear_units=192, num_blocks=3)
    c.update(batch_size=6, total_steps=100, checkpoint_every=100)
    c.optim.update(lr=2e-3, warmup_ratio=0.1)
    m = vita_jax.init_model(c)
    feats = np.concatenate([A.audio_features(w, 16000) for w in waves])
    enc = m.params["audio_encoder"]["encoder"]
    enc["cmvn_mean"], enc["cmvn_istd"] = feats.mean(0), 1.0 / np.maximum(feats.std(0), 1e-5)
    m.save_pretrained(str(tmp_path / "init"), format="orbax")
    vocab = UnitVocab.train(texts)
    c.init_from, c.ctc_units = str(tmp_path / "init"), vocab.num_units
    batch = ctc_batch(waves, texts, vocab)
    out = trainer.train(c, str(tmp_path / "wd"), data=pipeline.IndexedBatches(lambda i: batch),
                        log=lambda *_: None, progress=False)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "wd" / "metrics.jsonl")]
    assert len(losses) == 100 and losses[-1] < 0.05 * losses[0]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    params = stages.merge(out["state"].train, out["state"].frozen)
    logits, mask = ctc.WhaleCTC(vita.audio_config(c), vocab.num_units).apply(
        {"params": {"encoder": params["audio_encoder"]["encoder"], "ctc": params["ctc"]}}, batch["feats"],
        batch["lengths"])
    hyps = [vocab.decode(h) for h in ctc.greedy_decode(logits, np.asarray(mask).sum(-1))]
    assert cer(texts, hyps) <= 0.05, list(zip(texts, hyps))
