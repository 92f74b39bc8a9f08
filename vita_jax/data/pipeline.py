"""grain input pipelines: sources mixed by weight, per-example host preprocessing, collation into
static-shape batches, deterministic shuffling from a seed, a checkpointable iterator, and how a
stage's global batch splits over micro-batches and processes.

:func:`official_data` is what the trainer feeds on (official JSON files and TFDS datasets);
:func:`held_out_batches` gives the same batches of a held-out file for evaluation (the demo).
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from typing import Callable, Sequence

import grain
import jax
import numpy as np

from vita_jax import parallel
from vita_jax.data import batch as batch_lib
from vita_jax.data import packing, sources
from vita_jax.models import vita
from vita_jax.sizes import round_up

log = logging.getLogger(__name__)


def batch_layout(config) -> dict:
    """How the global batch splits: ``config.batch_size`` examples per step = ``grad_accum``
    micro-batches, each spread over the processes; ``local`` = examples per process per
    micro-batch, ``index`` / ``count`` = this process and the number of processes."""
    b, accum, n = int(config.batch_size), int(config.grad_accum), jax.process_count()
    if b % (accum * n):
        raise ValueError(f"batch_size {b} must be divisible by grad_accum {accum} x processes {n}")
    local = b // accum // n
    shards = batch_shards(config)
    return dict(local=local, index=jax.process_index(), count=n, accum=accum,
                shards=shards if local % shards == 0 else 1)


def batch_shards(config) -> int:
    """The batch shards on this process's devices: ``data x fsdp`` of ``config.mesh_shape`` (the trainer's mesh)
    over the processes; 1 on one device or where that mesh cannot be made here. Each shard's rows keep their
    tiles and clips in its own slots (``shards`` of :func:`batch_layout`), so the model splices on each chip."""
    if jax.device_count() == 1:
        return 1
    try:
        mesh = parallel.make_mesh(dict(config.get("mesh_shape", {"data": -1})))
    except ValueError:
        return 1
    return max(1, parallel.data_parallel_size(mesh) // jax.process_count())


def stack_micro_batches(micro_batches: Sequence) -> dict:
    """One step's micro-batches (host batches of one static structure) -> the step's batch: every
    leaf stacked on a new leading axis ``[accum, ...]``, the structure kept (dicts, packing's lists
    of clip groups, None leaves). Leaves are numpy arrays (the trainer) or ``jax.ShapeDtypeStruct``
    (``vita-jax compile``'s abstract batch). Micro-batches of different structure or leaf shapes
    raise a ValueError naming the leaf (a step compiles for one shape)."""
    def stack(where: str, xs: list):
        first = xs[0]
        if isinstance(first, dict):
            if any(not isinstance(x, dict) or x.keys() != first.keys() for x in xs):
                raise ValueError(f"micro-batches differ in their keys at {where or 'the top'}: "
                                 f"{[sorted(x) if isinstance(x, dict) else type(x).__name__ for x in xs]}")
            return {k: stack(f"{where}[{k!r}]", [x[k] for x in xs]) for k in first}
        if isinstance(first, (list, tuple)):
            if any(not isinstance(x, (list, tuple)) or len(x) != len(first) for x in xs):
                raise ValueError(f"micro-batches differ in their number of {where} (clip groups?): "
                                 f"{[len(x) if isinstance(x, (list, tuple)) else None for x in xs]}")
            return type(first)(stack(f"{where}[{i}]", [x[i] for x in xs]) for i in range(len(first)))
        if first is None or any(x is None for x in xs):
            if any(x is not None for x in xs):
                raise ValueError(f"micro-batches differ at {where}: None in some, an array in others")
            return None
        shapes = {(tuple(np.shape(x)), str(x.dtype)) for x in xs}
        if len(shapes) > 1:
            raise ValueError(f"micro-batches differ in the shape of {where}: {sorted(shapes)} (one step, one shape)")
        if isinstance(first, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct((len(xs),) + tuple(first.shape), first.dtype)
        return np.stack([np.asarray(x) for x in xs])
    return stack("", list(micro_batches))


def lm_collator(config, layout: dict) -> batch_lib.LMCollator:
    """The LM stages' collator: ``config.data`` budgets per sample (tiles, clips, frames) times
    this process's rows, tile / clip offsets of this process in the global batch."""
    d = config.data
    vc = vita.vision_config(config)
    tiles, clips = d.max_tiles_per_sample * layout["local"], d.max_clips_per_sample * layout["local"]
    return batch_lib.LMCollator(vc.tokens_per_tile, d.seq_len, tiles, clips, d.max_frames, vc.image_size,
                                tile_offset=layout["index"] * tiles, clip_offset=layout["index"] * clips,
                                shards=layout.get("shards", 1))


def shard_layouts(layout: dict) -> list[dict]:
    """:func:`batch_layout` of this process -> one layout per batch shard of its devices, each a process of its own
    (its rows, its index among all processes' shards, their count); ``split``: the shards a process's configured
    ``data.tile_budget`` divides over."""
    k = int(layout.get("shards", 1))
    return [dict(layout, local=layout["local"] // k, index=layout["index"] * k + j, count=layout["count"] * k,
                 shards=1, split=k) for j in range(k)]


def packing_budget(config, layout: dict, tile_slots: int = 0, audio_groups=None) -> packing.Budget:
    """The static shape of this process's packed batch: ``local`` rows of ``data.seq_len``; tile slots
    ``tile_slots`` (else ``data.tile_budget``, else the per-sample maximum times the rows); clip
    slots in ``audio_groups`` / ``data.audio_buckets`` (``[[frames, slots], ...]``), else the
    per-sample maximum times the rows, each of ``data.max_frames``."""
    d = config.data
    vc = vita.vision_config(config)
    split = int(layout.get("split", 1))  # data.tile_budget / audio_buckets are a process's; a batch shard's share
    tiles = int(tile_slots or -(-int(d.get("tile_budget", 0)) // split) or d.max_tiles_per_sample * layout["local"])
    clips = d.max_clips_per_sample * layout["local"]
    groups = audio_groups or [[int(f), -(-int(n) // split)] for f, n in d.get("audio_buckets", [])] or None
    return packing.Budget(layout["local"], d.seq_len, tiles, clips, d.max_frames, vc.tokens_per_tile, vc.image_size,
                          tile_offset=layout["index"] * tiles, clip_offset=layout["index"] * clips,
                          audio_groups=groups, shard=(layout["index"], layout["count"]))


MAX_GROUPS, MIN_CLIPS_PER_GROUP = 12, 1.5  # clip groups: each one more whale compile; few clips a group fill badly


def group_lengths(lens: np.ndarray, k: int, multiple: int = 16) -> list[int]:
    """Up to ``k`` slot lengths (multiples of ``multiple``, the longest >= every clip) that minimise
    the padding of ``lens`` (sorted clip lengths), each clip in the shortest slot that holds it:
    a dynamic programme over the sorted lengths (a group = a run of them, its slot = its longest)."""
    w = round_up(np.asarray(lens, np.int64), multiple)
    n = len(w)
    pre = np.concatenate([[0], np.cumsum(lens)])
    # cost[i, j]: clips i..j (inclusive) in one slot length w[j]
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    cost = np.where(i <= j, (j - i + 1) * w[j] - (pre[j + 1] - pre[i]), np.inf)
    best, back = cost[0].copy(), []  # best[j]: clips 0..j in g groups
    for _ in range(1, k):
        cand = best[:, None] + np.vstack([cost[1:], np.full((1, n), np.inf)])  # last group starts after i
        arg = np.argmin(cand, axis=0)
        new = cand[arg, np.arange(n)]
        back.append(np.where(new < best, arg, -1))
        best = np.minimum(best, new)
    out, j = [], n - 1
    for b in reversed(back):
        if b[j] >= 0:
            out.append(int(w[j]))
            j = int(b[j])
    out.append(int(w[j]))
    return sorted(set(out))


def calibrate(config, dataset, transform, layout: dict, workers: int = 4) -> tuple[int, list, dict]:
    """Per-step media budgets sized to the data (``data.budgets = "auto"``): reads the first
    ``data.calibration_examples`` samples of the *global* stream (the same on every process, so
    every process derives the same shapes) and returns ``(tile slots, [[frames, slots], ...],
    report)``: the tiles and clips that rows of ``seq_len`` filled with such examples hold, the
    clips split into up to ``MAX_GROUPS`` groups at length quantiles (the longest group: the
    longest clip seen, rounded up to 16 frames; a longer clip later is skipped and reported by id).
    Budgets match the expected need; the examples that do not fit a step's slots wait while others
    fill the rows."""
    d = config.data
    full = packing_budget(config, layout)
    n = int(d.get("calibration_examples", 1024))

    def sizes(i: int):
        """``(spliced length, tiles, clip frames)`` of sample ``i`` (None: unusable); its pixels and
        features are dropped here, so the memory held does not grow with ``n``."""
        ex = transform(dataset[i]) if transform is not None else dataset[i]
        if ex.get("bad") or full.never_fits(ex) is not None:
            return None
        return full.length(ex), batch_lib.example_tiles(ex), [len(a) for a in batch_lib.example_clips(ex)]
    with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
        exs = [e for e in pool.map(sizes, range(n)) if e is not None]
    if not exs:
        raise ValueError(f"data.budgets = 'auto': none of the first {n} samples is usable; set data.budgets = 'fixed'")
    per_step = full.rows * full.seq_len / np.mean([length for length, _, _ in exs])  # examples in full rows
    tiles = [t for _, t, _ in exs]
    tile_slots = max(max(tiles), int(round(per_step * np.mean(tiles))))
    lens = np.sort([f for _, _, clips in exs for f in clips])
    groups = []
    if len(lens):
        clips = per_step * len(lens) / len(exs)
        k = int(np.clip(clips // MIN_CLIPS_PER_GROUP, 1, MAX_GROUPS))
        edges = group_lengths(lens, k)
        raw = np.array([np.mean((lens > lo) & (lens <= e)) for lo, e in zip([0] + edges[:-1], edges)]) * clips
        # the expected clip count rounded down (largest remainders share it out), each group at least one:
        # measured on the bench mixture, rounding up leaves ~6 % of the slots empty, rounding down keeps
        # a bounded queue of waiting speech examples and the rows as full (bench data, docs/training.md)
        slots = np.floor(raw).astype(int)
        for g in np.argsort(-(raw - slots))[:max(0, int(clips) - int(slots.sum()))]:
            slots[g] += 1
        groups = [[min(e, int(d.max_frames)), max(1, int(n))] for e, n in zip(edges, slots)]
    report = dict(examples=len(exs), examples_per_step=per_step, tile_slots=tile_slots, audio_groups=groups,
                  longest_clip=int(lens[-1]) if len(lens) else 0)
    return tile_slots, groups, report


def official_transform(config, tokenizer) -> sources.OfficialExamples:
    """The host preprocessing of one official sample: the inference preprocessing of the config."""
    return sources.OfficialExamples(tokenizer, batch_lib.preprocess_settings(config))


def official_data(config, tokenizer):
    """``config.data.mixture`` (official JSON files) and ``config.data.tfds`` (array_record datasets
    written by :func:`~vita_jax.data.tfds_source.write_tfds`) -> a checkpointable iterator of this
    process's micro-batches (``.skipped``: the skipped samples by id). With ``config.data.packing``
    the rows are packed (:mod:`vita_jax.data.packing`), else one example per row."""
    d = config.data
    lay = batch_layout(config)
    files = [dict(m) for m in d.mixture]
    tfds = [dict(t) for t in d.tfds]
    workers = int(d.get("workers", 4))
    outside = bool(d.get("allow_outside_media_root", False))
    if d.get("packing", False):
        ds = mixture(files, int(d.shuffle_seed), tfds=tfds, allow_outside_root=outside).repeat(None)
        tf = official_transform(config, tokenizer)
        shards = shard_layouts(lay)  # each batch shard packs its own rows within its own media budget
        tiles, groups = 0, None
        if d.get("budgets", "fixed") == "auto":
            tiles, groups, report = calibrate(config, ds, tf, shards[0], workers)
            log.info("data budgets from %d examples: %s", report["examples"], report)
        parts = [packing.PackedBatches(ds, tf, packing_budget(config, s, tiles, groups), shard=(s["index"], s["count"]),
                                       workers=workers and max(1, workers // len(shards)))
                 for s in shards]
        return parts[0] if len(parts) == 1 else packing.ShardedBatches(parts)
    col = lm_collator(config, lay)
    ds = mixture(files, int(d.shuffle_seed), tfds=tfds, allow_outside_root=outside)
    it = make_iterator(ds, lay["local"], col, transform=official_transform(config, tokenizer),
                       shard=(lay["index"], lay["count"]), workers=workers)
    it.collator = col
    it.skipped = col.skipped
    return it


def held_out_batches(config, tokenizer, path: str, batch_size: int) -> list[dict]:
    """The samples of one official JSON file, in order, as the trainer's batches of
    ``batch_size`` rows (a last partial batch is dropped)."""
    src = sources.OfficialJSON(path)
    tf = official_transform(config, tokenizer)
    col = lm_collator(config, dict(local=batch_size, index=0, count=1, accum=1))
    exs = [tf(src[i]) for i in range(len(src))]
    return [col(exs[i:i + batch_size]) for i in range(0, len(exs) - batch_size + 1, batch_size)]


def mixture(files: Sequence[dict] = (), seed: int = 0, tfds: Sequence[dict] = (), allow_outside_root: bool = False):
    """``files = [{"json": path, "weight": w, "media_root": dir, "sets": {...}, "allow_outside_root":
    false}, ...]`` and ``tfds = [{"name": name_or_dir, "split": "train", "data_dir": dir, "weight": w},
    ...]`` (datasets written by :func:`~vita_jax.data.tfds_source.write_tfds`) -> a grain
    ``MapDataset`` mixing all sources by weight (deterministic: source ``i`` is shuffled with
    ``seed + i``, JSON files first, then the TFDS datasets). A file's media paths must stay inside
    its media root unless its entry (or, for entries that do not say, ``allow_outside_root``) allows it."""
    for k, f in enumerate(files):
        if not hasattr(f, "get") or not f.get("json"):
            raise ValueError(f"config.data.mixture[{k}] = {f!r}: each entry needs a 'json' key (the data file)")
    for name, entries in (("mixture", files), ("tfds", tfds)):
        for k, f in enumerate(entries):
            w = f.get("weight", 1.0) if hasattr(f, "get") else 1.0
            if not isinstance(w, (int, float)) or not 0 < float(w) < float("inf"):
                raise ValueError(f"config.data.{name}[{k}]: weight {w!r} must be a number > 0")
    for k, t in enumerate(tfds):
        if not hasattr(t, "get") or not t.get("name"):
            raise ValueError(f"config.data.tfds[{k}] = {t!r}: each entry needs a 'name' key (dataset name or folder)")
    srcs = [(sources.OfficialJSON(f["json"], f.get("media_root"), f.get("sets"),
                                  bool(f.get("allow_outside_root", allow_outside_root))), f) for f in files]
    if tfds:
        from vita_jax.data.tfds_source import TFDSSource  # imports tensorflow_datasets (~1 s): only when used
        srcs += [(TFDSSource(t["name"], t.get("split", "train"), t.get("data_dir")), t) for t in tfds]
    if not srcs:
        raise ValueError("mixture: no JSON file and no TFDS dataset given")
    ds = [grain.MapDataset.source(src).shuffle(seed=seed + i) for i, (src, _) in enumerate(srcs)]
    if len(ds) == 1:
        return ds[0]
    return grain.MapDataset.mix(ds, [float(f.get("weight", 1.0)) for _, f in srcs])


def make_iterator(source, batch_size: int, collate, seed: int = 0, num_epochs: int | None = None, transform=None,
                  shard: tuple[int, int] = (0, 1), workers: int = 4):
    """Deterministically shuffled (per epoch, from ``seed``), repeated, batched; ``transform``
    (host preprocessing) runs per example, ``collate`` per batch. The iterator has ``get_state()``
    / ``set_state()`` for checkpoints. ``source`` is a random-access source or a grain MapDataset.

    ``shard = (index, count)``: the stream is cut into global batches of ``count * batch_size``
    and this process keeps rows ``index * batch_size ...`` of each, reading (and preprocessing)
    only those: the processes together feed exactly the rows, in the order, of one process.

    ``workers``: batches preprocessed ahead in that many grain threads (0: in the caller's thread);
    grain's iterator state accounts for them, so a restored iterator continues with the same batch."""
    ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source).shuffle(seed=seed)
    index, count = shard
    lo, hi = index * batch_size, (index + 1) * batch_size

    def local_batch(samples):
        samples = samples[lo:hi]
        return collate([transform(x) for x in samples] if transform is not None else samples)
    ds = ds.repeat(num_epochs).batch(batch_size * count, drop_remainder=True, batch_fn=list).map(local_batch)
    # grain's default (16 threads, 500 elements ahead) would hold hundreds of real-size batches in memory
    opts = grain.ReadOptions(num_threads=max(int(workers), 0), prefetch_buffer_size=max(2 * int(workers), 1))
    return iter(ds.to_iter_dataset(opts))


class Prefetch:
    """The next ``depth`` steps' inputs, made ahead in a background thread while the device runs.

    ``produce()`` makes one item (the trainer's: the host batch of a step, the data-iterator state
    after it, placed on the devices); it alone touches the data iterator once started. ``next()``
    returns ``(item, wait_s)``, ``wait_s`` being the seconds the caller was kept waiting. An error
    in ``produce`` is raised, unchanged, by the ``next()`` that would have got its item. ``depth=0``
    makes each item on demand in the caller's thread (no overlap)."""

    def __init__(self, produce: Callable, depth: int = 2):
        self.produce, self.depth = produce, int(depth)
        self._stop = threading.Event()
        self._thread = None
        if self.depth > 0:
            self._q: queue.Queue = queue.Queue(maxsize=self.depth)
            self._thread = threading.Thread(target=self._work, name="vita-prefetch", daemon=True)
            self._thread.start()

    def _work(self):
        while not self._stop.is_set():
            try:
                item = (True, self.produce())
            except BaseException as e:  # handed to the consumer, raised there
                item = (False, e)
            while not self._stop.is_set():
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not item[0]:
                return

    def next(self):
        t = time.perf_counter()
        if self._thread is None:
            item = self.produce()
            return item, time.perf_counter() - t
        ok, item = self._q.get()
        if not ok:
            self._stop.set()
            raise item
        return item, time.perf_counter() - t

    def close(self):
        """Stops the thread (items made ahead are dropped; their data state was never handed out)."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._q.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()


class IndexedBatches:
    """A checkpointable iterator over ``make(i)`` for i = 0, 1, ... (state: the next index).
    ``make`` builds the global micro-batch; this process keeps its rows (``rows = (index, count)``)."""

    def __init__(self, make, rows=(0, 1)):
        self.make, self.i, self.rows = make, 0, rows

    def __iter__(self):
        return self

    def __next__(self):
        b = self.make(self.i)
        self.i += 1
        index, count = self.rows
        if count > 1:
            n = len(next(iter(b.values()))) // count
            b = {k: v[index * n:(index + 1) * n] for k, v in b.items()}
        return b

    def get_state(self):
        return {"next_index": self.i}

    def set_state(self, state):
        self.i = int(state["next_index"])
