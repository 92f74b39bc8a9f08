"""Small on-the-fly datasets for the tiny stage configs (tests, smoke runs): each a checkpointable
iterator of this process's micro-batches.

* LM stages: :class:`SyntheticLM`, a learnable multimodal set: each example shows a solid-colour
  tile and a class-dependent audio pattern, and the answer names the class, so a model only lowers
  the loss by reading the image / audio.
* Stage 2.1a: the bundled real CMU ARCTIC clips with their transcripts (:func:`ctc_data` also
  returns the size of the unit vocabulary it trains, for the CTC head).
* Stage 3.2: random text ids whose codes are a fixed function of the text (:func:`tts_data`).
"""
from __future__ import annotations

import numpy as np

from vita_jax import assets
from vita_jax.data import pipeline, stage_batches
from vita_jax.data.units import UnitVocab
from vita_jax.models import vita
from vita_jax.models.vita import IGNORE_INDEX


class SyntheticLM:
    """Examples in the spliced-id format: ``input_ids``, ``labels``, ``pixels [1, 3, S, S]`` and one
    fbank clip ``[frames, 80]``. Classes pick the tile colour, the audio pattern and the answer ids."""

    def __init__(self, size: int = 256, image_size: int = 56, frames: int = 120, vocab: int = 512, n_classes: int = 4,
                 with_image: bool = True, with_audio: bool = True, seed: int = 0):
        self.size, self.s, self.frames, self.vocab, self.k = size, image_size, frames, vocab, n_classes
        self.with_image, self.with_audio, self.seed = with_image, with_audio, seed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        rng = np.random.default_rng((self.seed, int(i)))
        c = int(rng.integers(self.k))
        head = [501, 12, 10] + ([-200, 10] if self.with_image else []) + list(rng.integers(30, 400, 3)) + \
            ([-500] if self.with_audio else []) + [502, 10, 501, 13, 10]
        answer = [503, 400 + 7 * c, 401 + 7 * c, 402 + 7 * c, 502]
        ids = np.asarray(head + answer, np.int64)
        labels = np.full(ids.shape, IGNORE_INDEX, np.int64)
        labels[len(head):] = answer
        ex = {"id": f"synthetic-{i}", "input_ids": ids, "labels": labels}
        if self.with_image:
            colour = np.array([[1.5, -1, -1], [-1, 1.5, -1], [-1, -1, 1.5], [1, 1, -1]], np.float32)[c % 4]
            ex["pixels"] = np.broadcast_to(colour[None, :, None, None], (1, 3, self.s, self.s)).copy() + \
                rng.normal(0, 0.1, (1, 3, self.s, self.s)).astype(np.float32)
        if self.with_audio:
            t = np.arange(self.frames)[:, None]
            ex["audio"] = (10 + 3 * np.sin(t * (c + 1) / 7.0 + np.arange(80)[None] / 9.0)).astype(np.float32)
        return ex


def lm_data(config):
    lay = pipeline.batch_layout(config)
    d = config.data
    vc = vita.vision_config(config)
    src = SyntheticLM(size=d.synthetic_size, image_size=vc.image_size, frames=min(120, d.max_frames),
                      vocab=config.llm.vocab_size, seed=int(d.shuffle_seed))
    return pipeline.make_iterator(src, lay["local"], pipeline.lm_collator(config, lay), seed=int(d.shuffle_seed),
                                  shard=(lay["index"], lay["count"]))


def ctc_vocab() -> UnitVocab:
    """The unit vocabulary trained from the bundled clips' transcripts."""
    return UnitVocab.train([t for *_, t in assets.speech_clips()])


def ctc_data(config) -> tuple[pipeline.IndexedBatches, int]:
    """Stage 2.1a on the bundled real clips: batches of ``batch_size`` clips in a seeded order, and
    the number of CTC units (blank included) of their vocabulary."""
    clips = assets.speech_clips()
    vocab = ctc_vocab()
    lay = pipeline.batch_layout(config)
    bs = int(config.batch_size) // lay["accum"]
    width = max(len(vocab.encode(t)) for *_, t in clips)  # fixed shapes: one compilation

    def make(i):
        order = np.random.default_rng((int(config.data.shuffle_seed), i)).permutation(len(clips))[:bs]
        return stage_batches.ctc_batch([clips[k][1] for k in order], [clips[k][2] for k in order], vocab,
                                   frame_bucket=512, label_width=width)
    return pipeline.IndexedBatches(make, (lay["index"], lay["count"])), vocab.num_units


def tts_data(config) -> pipeline.IndexedBatches:
    """Stage 3.2, tiny: random text ids whose codes are a fixed function of the text (2 codes per
    token), so the decoder can learn the mapping."""
    tc = vita.tts_config(config)
    lay = pipeline.batch_layout(config)
    bs, n_text = int(config.batch_size) // lay["accum"], 6

    def make(i):
        rng = np.random.default_rng((int(config.data.shuffle_seed), i))
        lens = rng.integers(3, n_text + 1, bs)
        ids = rng.integers(30, min(500, config.llm.vocab_size), (bs, n_text))
        texts = [ids[b, :lens[b]] for b in range(bs)]
        codes = [np.stack([(t * 7) % tc.odim, (t * 13 + 5) % tc.odim], 1).reshape(-1) for t in texts]
        out = stage_batches.tts_batch(texts, codes, n_text, 2 * n_text)
        out["text_ids"] = ids.astype(np.int32)  # the padding positions keep their random ids, as before
        return out
    return pipeline.IndexedBatches(make, (lay["index"], lay["count"]))


def synthetic_data(config):
    """``(iterator, ctc_units)`` of the tiny config's synthetic set for the stage's loss;
    ``ctc_units`` is the CTC head's size for stage 2.1a, else None."""
    if config.loss == "lm":
        return lm_data(config), None
    if config.loss == "ctc":
        return ctc_data(config)
    if config.loss == "tts":
        return tts_data(config), None
    raise ValueError(f"no synthetic data for loss {config.loss!r}")
