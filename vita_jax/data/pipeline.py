"""grain input pipelines: per-example host preprocessing, collation into static-shape batches
(buckets), deterministic shuffling from a seed, and a checkpointable iterator.

Sources are random-access (``__len__`` / ``__getitem__``). :class:`SyntheticLM` makes a small
learnable multimodal dataset on the fly for the tiny configs: each example shows a solid-colour
tile and a class-dependent audio pattern, and the answer names the class, so a model only lowers
the loss by reading the image / audio.
"""
from __future__ import annotations

import logging

import grain
import numpy as np

from vita_jax.models.vita import AUDIO, IGNORE_INDEX, IMAGE, plan_splice

log = logging.getLogger(__name__)


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


class LMCollator:
    """Examples -> one static-shape batch for the LM stages (``kind``, ``text_ids``, ``src``,
    ``labels``, ``pixels``, ``audio_feats``, ``audio_lens``): tiles padded to ``max_tiles``, clips
    to ``max_clips`` x ``max_frames``, the spliced sequence to ``seq_len``, rows to the number of
    examples. Examples that do not fit are replaced by all-padding rows (counted and logged with
    their id), so every batch has the same shape.

    With several processes each collates its own rows; ``tile_offset`` / ``clip_offset`` (this
    process's first row in the *global* tile / clip arrays) make ``src`` index the global arrays
    that ``jax.make_array_from_process_local_data`` assembles from the per-process pieces."""

    def __init__(self, tokens_per_tile: int, seq_len: int, max_tiles: int, max_clips: int, max_frames: int,
                 image_size: int, llm_length_fn, tile_offset: int = 0, clip_offset: int = 0):
        self.tpt, self.seq_len, self.max_tiles, self.max_clips, self.max_frames = (tokens_per_tile, seq_len, max_tiles,
                                                                                    max_clips, max_frames)
        self.s, self.llm_length = image_size, llm_length_fn
        self.tile_offset, self.clip_offset = tile_offset, clip_offset
        self.skipped: dict[str, str] = {}

    def __call__(self, examples):
        ids, labels, pixels, clips = [], [], [], []
        for ex in examples:
            if "bad" in ex:
                self.skipped[ex.get("id", "?")] = ex["bad"]
                continue
            n_tiles = 0 if ex.get("pixels") is None else len(ex["pixels"])
            ex_clips = [] if ex.get("audio") is None else (ex["audio"] if isinstance(ex["audio"], list) else [ex["audio"]])
            spliced = len(ex["input_ids"]) + n_tiles * (self.tpt - 1) + \
                sum(int(self.llm_length(len(a))) - 1 for a in ex_clips)
            problem = None
            if spliced > self.seq_len:
                problem = f"{spliced} spliced positions > seq_len {self.seq_len}"
            elif sum(len(p) for p in pixels) + n_tiles > self.max_tiles or len(clips) + len(ex_clips) > self.max_clips:
                problem = "media over the batch bucket"
            elif any(len(a) > self.max_frames for a in ex_clips):
                problem = f"audio over {self.max_frames} frames"
            if problem:
                self.skipped[ex.get("id", "?")] = problem
                log.warning("skipping sample %s: %s", ex.get("id", "?"), problem)
                continue
            ids.append(ex["input_ids"])
            labels.append(ex["labels"])
            if n_tiles:
                pixels.append(ex["pixels"])
            clips += ex_clips
        L = max([len(i) for i in ids] + [1])
        rows = len(examples)  # bad examples leave all-padding rows: one static shape
        id_arr = np.full((rows, L), 0, np.int64)
        lab_arr = np.full((rows, L), IGNORE_INDEX, np.int64)
        mask = np.zeros((rows, L), bool)
        for b, (i, lab) in enumerate(zip(ids, labels)):
            id_arr[b, :len(i)], lab_arr[b, :len(i)], mask[b, :len(i)] = i, lab, True
        llm_lens = [int(self.llm_length(len(a))) for a in clips]
        audio_len = int(self.llm_length(self.max_frames))
        plan = plan_splice(id_arr, mask, lab_arr, tokens_per_tile=self.tpt, audio_llm_lengths=llm_lens,
                           audio_len=audio_len, max_length=self.seq_len, pad_to=self.seq_len)
        image_rows, audio_rows = plan.kind == IMAGE, plan.kind == AUDIO
        plan.src[image_rows] += self.tile_offset * self.tpt
        plan.src[audio_rows] += self.clip_offset * audio_len
        px = np.zeros((self.max_tiles, 3, self.s, self.s), np.float32)
        if pixels:
            allpx = np.concatenate(pixels)
            px[:len(allpx)] = allpx
        feats = np.zeros((self.max_clips, self.max_frames, 80), np.float32)
        lens = np.full((self.max_clips,), self.max_frames, np.int32)
        for k, a in enumerate(clips):
            feats[k, :len(a)] = a
            lens[k] = len(a)
        return dict(kind=plan.kind, text_ids=plan.text_ids, src=plan.src, labels=plan.labels, pixels=px,
                    audio_feats=feats, audio_lens=lens)


def make_iterator(source, batch_size: int, collate, seed: int = 0, num_epochs: int | None = None, transform=None,
                  shard: tuple[int, int] = (0, 1)):
    """Deterministically shuffled (per epoch, from ``seed``), repeated, batched; ``transform``
    (host preprocessing) runs per example, ``collate`` per batch. The iterator has ``get_state()``
    / ``set_state()`` for checkpoints. ``source`` is a random-access source or a grain MapDataset.

    ``shard = (index, count)``: the stream is cut into global batches of ``count * batch_size``
    and this process keeps rows ``index * batch_size ...`` of each, reading (and preprocessing)
    only those: the processes together feed exactly the rows, in the order, of one process."""
    ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source).shuffle(seed=seed)
    index, count = shard
    lo, hi = index * batch_size, (index + 1) * batch_size

    def local_batch(samples):
        samples = samples[lo:hi]
        return collate([transform(x) for x in samples] if transform is not None else samples)
    ds = ds.repeat(num_epochs).batch(batch_size * count, drop_remainder=True, batch_fn=list).map(local_batch)
    return iter(ds.to_iter_dataset())
