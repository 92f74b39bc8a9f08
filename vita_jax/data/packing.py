"""Packing: several examples share one row of ``seq_len`` spliced positions, so the LLM computes on
real tokens instead of padding (``config.data.packing``).

:func:`pack` lays placed examples out as :func:`vita_jax.data.batch.build` does for one row each
(same tiles, clips, splice plan), then concatenates each row's examples: ``segment_ids`` 1, 2, ...
per example (0 on padding) keep attention inside an example, ``positions`` restart at 0 for each
example, and the label of each example's first position is ignored (the official loss never
targets a sequence's first token), so the loss of a packed batch is the summed CE / target count
of the same examples computed one by one.

:class:`PackedBatches` is the checkpointable iterator: it reads this process's share of the example
stream (positions ``index, index + count, ...`` of a random-access dataset), places the examples
that waited first (oldest first), then new ones first-fit decreasing by length, within the row
length and the batch's tile / clip / frame budgets. An example that does not fit waits for the
next step (never dropped, never duplicated); one that can never fit (longer than a row, more
media than a whole batch holds) or is bad is skipped and reported by id. State: the next stream
position and the waiting positions (re-read on restore), so a resume continues bitwise.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np

from vita_jax.data.batch import (
    ClipGroup,
    build,
    concat_tiles,
    example_clips,
    example_problem,
    example_tiles,
    pad_rows,
    spliced_length,
)
from vita_jax.models.vita import IGNORE_INDEX, PAD
from vita_jax.models.whale import llm_length

log = logging.getLogger(__name__)


class Budget:
    """The static shape of one process's packed batch and the size of an example within it.

    Clip slots: ``clip_slots`` x ``frame_slots`` (one array), or ``audio_groups = [(frames, slots),
    ...]``: one array per group, so the whale encoder computes clips padded to the nearest group
    length instead of ``frame_slots``; ``shard = (index, count)`` places this process's slots in
    the global group arrays. A clip goes to the shortest group that holds it with a slot free."""

    def __init__(self, rows: int, seq_len: int, tile_slots: int, clip_slots: int, frame_slots: int,
                 tokens_per_tile: int, image_size: int, tile_offset: int = 0, clip_offset: int = 0,
                 audio_groups: Optional[Sequence[Sequence[int]]] = None, shard: tuple[int, int] = (0, 1)):
        self.rows, self.seq_len, self.tile_slots, self.clip_slots, self.frame_slots = (rows, seq_len, tile_slots,
                                                                                        clip_slots, frame_slots)
        self.tpt, self.image_size, self.tile_offset, self.clip_offset = (tokens_per_tile, image_size, tile_offset,
                                                                         clip_offset)
        self.groups = None
        if audio_groups is not None:
            index, count = shard
            self.groups, base = [], 0
            for frames, slots in sorted((int(f), int(n)) for f, n in audio_groups):
                self.groups.append(ClipGroup(frames, slots, base, index * slots))
                base += slots * count * int(llm_length(frames))
            self.clip_slots = sum(g.slots for g in self.groups)
            self.frame_slots = max([g.frames for g in self.groups], default=0)

    def length(self, ex) -> int:
        """Spliced positions of one example."""
        return spliced_length(ex, self.tpt)

    def clip_groups(self, lengths: Sequence[int]) -> Optional[list[int]]:
        """The group of each clip (frames ``lengths``) when they all fit the slots together, else None:
        longest clip first, each into the shortest group with a slot left (optimal for nested sizes)."""
        if self.groups is None:
            ok = len(lengths) <= self.clip_slots and all(n <= self.frame_slots for n in lengths)
            return [0] * len(lengths) if ok else None
        free = [g.slots for g in self.groups]
        out = [0] * len(lengths)
        for k in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
            g = next((g for g, grp in enumerate(self.groups) if grp.frames >= lengths[k] and free[g]), None)
            if g is None:
                return None
            out[k], free[g] = g, free[g] - 1
        return out

    def never_fits(self, ex) -> Optional[str]:
        """Why an example cannot go into any batch of this shape (None if it can)."""
        problem = example_problem(ex, self.tpt, self.seq_len, self.frame_slots)
        tiles, clips = example_tiles(ex), example_clips(ex)
        if problem is None and (tiles > self.tile_slots or self.clip_groups([len(a) for a in clips]) is None):
            slots = self.clip_slots if self.groups is None else [(g.slots, g.frames) for g in self.groups]
            problem = (f"{tiles} tiles / {len(clips)} clips over the batch's {self.tile_slots} tiles / "
                       f"clip slots {slots}")
        return problem


def place(examples: Sequence[dict], budget: Budget, first_fit_order: Sequence[int]) -> tuple[list, list]:
    """First-fit of ``examples`` (in ``first_fit_order``) into ``budget.rows`` rows -> ``(rows as
    lists of example indices, indices left over)``."""
    free = [budget.seq_len] * budget.rows
    rows: list[list[int]] = [[] for _ in range(budget.rows)]
    tiles, clips = 0, []
    left = []
    for i in first_fit_order:
        ex = examples[i]
        n, t, c = budget.length(ex), example_tiles(ex), [len(a) for a in example_clips(ex)]
        r = next((r for r in range(budget.rows) if free[r] >= n), None)
        if r is None or tiles + t > budget.tile_slots or (c and budget.clip_groups(clips + c) is None):
            left.append(i)
            continue
        rows[r].append(i)
        free[r] -= n
        tiles, clips = tiles + t, clips + c
    return rows, left


def pack(examples: Sequence[dict], rows: Sequence[Sequence[int]], budget: Budget) -> dict:
    """The packed batch of ``examples`` placed in ``rows``: ``kind``, ``text_ids``, ``src``,
    ``labels``, ``segment_ids``, ``positions`` ``[rows, seq_len]``, ``pixels``, ``audio_feats``,
    ``audio_lens`` (static budget shapes)."""
    order = [i for row in rows for i in row]
    exs = [examples[i] for i in order]
    ids, labels, mask = pad_rows(exs)
    pixels = [e["pixels"] for e in exs if example_tiles(e)]
    px = concat_tiles(pixels, budget.image_size)
    clips = [a for e in exs for a in example_clips(e)]
    arrays, plan = build(ids, mask, labels, px, clips, tokens_per_tile=budget.tpt, max_length=budget.seq_len,
                         pad_to=1, tile_slots=budget.tile_slots, clip_slots=budget.clip_slots,
                         frame_slots=budget.frame_slots, tile_offset=budget.tile_offset,
                         clip_offset=budget.clip_offset, image_size=budget.image_size, clip_groups=budget.groups,
                         clip_group_of=budget.clip_groups([len(a) for a in clips]) if budget.groups else None)
    R, L = budget.rows, budget.seq_len
    out = dict(kind=np.full((R, L), PAD, np.int8), text_ids=np.zeros((R, L), np.int32),
               src=np.zeros((R, L), np.int32), labels=np.full((R, L), IGNORE_INDEX, np.int32),
               segment_ids=np.zeros((R, L), np.int32), positions=np.zeros((R, L), np.int32))
    k = 0
    for r, row in enumerate(rows):
        at = 0
        for seg, _ in enumerate(row, start=1):
            n = int(plan.lengths[k])
            for name in ("kind", "text_ids", "src", "labels"):
                out[name][r, at:at + n] = arrays[name][k, :n]
            out["labels"][r, at] = IGNORE_INDEX  # never a target: the official loss starts at position 1
            out["segment_ids"][r, at:at + n] = seg
            out["positions"][r, at:at + n] = np.arange(n)
            at, k = at + n, k + 1
    out["pixels"] = arrays["pixels"] if arrays["pixels"] is not None else concat_tiles([], budget.image_size)
    if arrays["audio_feats"] is not None:  # one array, or one per clip group
        out["audio_feats"], out["audio_lens"] = arrays["audio_feats"], arrays["audio_lens"]
    else:
        out["audio_feats"] = np.zeros((0, budget.frame_slots, 80), np.float32)
        out["audio_lens"] = np.zeros((0,), np.int32)
    return out


class PackedBatches:
    """Checkpointable iterator of packed batches over ``dataset`` (random access; ``transform``
    turns a sample into an example), reading stream positions ``index, index + count, ...``."""

    def __init__(self, dataset, transform, budget: Budget, shard=(0, 1), pool: int = 0, workers: int = 0):
        self.ds, self.transform, self.budget = dataset, transform, budget
        self.index, self.count = shard
        self.pool = pool or 64 * budget.rows  # new examples read per step at most (rows hold several)
        # candidates for a step: examples for ``lookahead`` times its positions, so that when a tile or clip
        # budget is spent others (text, other media) still fill the rows; the rest wait, oldest placed first
        self.lookahead = 2.0
        self.next, self.pending, self._cache = 0, [], {}
        # read-ahead: the next stream positions, about one step's new examples (:meth:`_window`), are preprocessed
        # in ``workers`` threads (PIL tiling, fbank and tokenizers release the GIL); which examples a step packs
        # does not depend on it
        self._workers = ThreadPoolExecutor(workers, thread_name_prefix="vita-pack") if workers > 0 else None
        self._n_workers, self._seen = workers, [0, 0]  # examples read, their spliced positions
        self.skipped: dict[str, str] = {}
        self.stats = dict(examples=0, real_positions=0, real_tiles=0, real_frames=0, steps=0)

    def _load(self, pos: int) -> dict:
        sample = self.ds[pos * self.count + self.index]
        return self.transform(sample) if self.transform is not None else sample

    def _example(self, pos: int) -> dict:
        if pos not in self._cache:
            self._cache[pos] = self._load(pos)
        ex = self._cache[pos]
        if not isinstance(ex, dict):  # a future of the read-ahead
            ex = self._cache[pos] = ex.result()
        return ex

    def _window(self) -> int:
        """Stream positions read ahead: the examples that fill a step's rows at the mean length seen
        so far (``2 x workers`` more, at most ``pool``), so the examples held (pixels, features)
        stay about one step's whatever the dataset size or the number of steps."""
        n, length = self._seen
        per_step = self.budget.rows * self.budget.seq_len * n / length if length else 0
        return int(min(self.pool, per_step + 2 * self._n_workers))

    def _read_ahead(self) -> None:
        if self._workers is None:
            return
        for pos in range(self.next, self.next + self._window()):
            if pos not in self._cache:
                self._cache[pos] = self._workers.submit(self._load, pos)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = self.budget
        self._read_ahead()
        cand = list(self.pending)  # oldest first
        new, length, reads = [], sum(b.length(self._example(p)) for p in cand), 0
        # reads are bounded too: a stream of bad samples ends the step (with padding rows), not the run
        while len(new) < self.pool and length < self.lookahead * b.rows * b.seq_len and reads < 4 * self.pool:
            pos, self.next, reads = self.next, self.next + 1, reads + 1
            self._read_ahead()  # a sliding window: the workers stay busy while the step's examples are read
            ex = self._example(pos)
            self._seen = [self._seen[0] + 1, self._seen[1] + (0 if ex.get("bad") else b.length(ex))]
            problem = ex.get("bad") or b.never_fits(ex)
            if problem:
                self.skipped[str(ex.get("id", pos))] = problem
                log.warning("skipping sample %s: %s", ex.get("id", pos), problem)
                self._cache.pop(pos)
                continue
            new.append(pos)
            length += b.length(ex)
        new.sort(key=lambda p: -b.length(self._example(p)))  # first-fit decreasing for the new ones
        positions = cand + new
        exs = [self._example(p) for p in positions]
        rows, left = place(exs, b, range(len(exs)))
        batch = pack(exs, rows, b)
        placed = {positions[i] for row in rows for i in row}
        self.pending = sorted(positions[i] for i in left)
        for p in placed:
            self._cache.pop(p)
        self.stats["examples"] += len(placed)
        self.stats["real_positions"] += int((batch["kind"] != PAD).sum())
        self.stats["real_tiles"] += sum(example_tiles(exs[i]) for row in rows for i in row)
        self.stats["real_frames"] += sum(len(a) for row in rows for i in row for a in example_clips(exs[i]))
        self.stats["steps"] += 1
        self._read_ahead()  # the next step's examples are made while this step runs
        return batch

    def get_state(self) -> dict:
        return {"next": self.next, "pending": list(self.pending)}

    def set_state(self, state: dict) -> None:
        if "shards" in state:
            raise ValueError(f"data state of {len(state['shards'])} batch shards per process, this mesh has 1: "
                             f"resume on the mesh the run was saved from")
        for f in self._cache.values():
            if not isinstance(f, dict):
                f.cancel()
        self.next, self.pending, self._cache = int(state["next"]), [int(p) for p in state["pending"]], {}


class ShardedBatches:
    """One process's batch shards packed side by side (``config.mesh_shape`` with several batch shards on its
    devices): each :class:`PackedBatches` part packs its own rows within its own tile and clip slots, and a
    batch is theirs concatenated (rows, tiles, each clip group's slots), so every row's media stay on its chip
    (:func:`vita_jax.data.shards.media_local`). State: the parts' states; ``skipped`` / ``stats``: all parts'."""

    def __init__(self, parts: Sequence[PackedBatches]):
        self.parts = list(parts)
        self.skipped: dict[str, str] = {}
        for p in self.parts:
            p.skipped = self.skipped

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batches = [next(p) for p in self.parts]
        cat = lambda xs: np.concatenate(xs)  # noqa: E731
        return {k: ([cat([b[k][g] for b in batches]) for g in range(len(v))] if isinstance(v, list)
                    else cat([b[k] for b in batches])) for k, v in batches[0].items()}

    @property
    def budget(self) -> Budget:
        """One shard's budget (every shard's is the same shape)."""
        return self.parts[0].budget

    @property
    def stats(self) -> dict:
        return {k: sum(p.stats[k] for p in self.parts) if k != "steps" else self.parts[0].stats[k]
                for k in self.parts[0].stats}

    def get_state(self) -> dict:
        return {"shards": [p.get_state() for p in self.parts]}

    def set_state(self, state: dict) -> None:
        saved = len(state["shards"]) if "shards" in state else 1
        if saved != len(self.parts):
            raise ValueError(f"data state of {saved} batch shard(s) per process, this mesh has {len(self.parts)}: "
                             f"resume on the mesh the run was saved from (or with data.packing off)")
        for p, st in zip(self.parts, state["shards"]):
            p.set_state(st)
