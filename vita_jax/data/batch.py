"""The one host batch builder of vita_jax: preprocessing settings from the config, the splice plan,
and the static-shape arrays the jitted model takes, for training, ``chat`` / ``generate``, the
demo and the tests alike.

* :func:`preprocess_settings` maps the config to the official preprocessing (dynamic tiling with
  ``image.max_dynamic_patch`` / ``min_dynamic_patch`` / ``use_thumbnail`` and the CLIP processor
  settings, video frame sampling, fbank), once; :class:`Preprocess` applies it to media.
* :func:`plan_splice` lays a batch out as the official ``prepare_inputs_labels_for_multimodal``
  does: padding removed with the attention mask, each ``-200`` replaced by the next tile's tokens
  (one global tile counter over the batch), each ``-500`` by the next clip's adapter rows truncated
  to its ``lengths_for_llm``, inserted rows labelled -100, each row cut to ``max_length`` *after*
  splicing, then right-padded.
* :func:`build` turns ids, labels, tiles and fbank clips into the model's arrays (``kind``,
  ``text_ids``, ``src``, ``labels``, ``pixels``, ``audio_feats``, ``audio_lens``) with the given
  slot counts: fixed budgets in training (:class:`LMCollator`), power-of-two buckets at inference.
* :class:`LMCollator` lays each batch shard's media in its own slots (:mod:`vita_jax.data.shards`); the batches
  of stages 2.1a and 3.2 are in :mod:`vita_jax.data.stage_batches`.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence

import numpy as np

from vita_jax.data import audio as audio_lib
from vita_jax.data import image as image_lib
from vita_jax.data import video as video_lib
from vita_jax.models.vita import AUDIO, AUDIO_TOKEN_INDEX, IGNORE_INDEX, IMAGE, IMAGE_TOKEN_INDEX, PAD, TEXT
from vita_jax.models.whale import WhaleConfig, llm_length
from vita_jax.sizes import round_up

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- preprocessing
@dataclasses.dataclass(frozen=True)
class Preprocess:
    """The official host preprocessing, one setting per field (defaults: VITA-1.5's)."""
    image: image_lib.ImageProcessorConfig = image_lib.ImageProcessorConfig()
    max_tiles: int = 12          # image.max_dynamic_patch
    min_tiles: int = 1           # image.min_dynamic_patch
    use_thumbnail: bool = True
    video_fps: float = 1.0
    video_max_frames: int = video_lib.MAX_FRAMES
    video_min_frames: int = video_lib.MIN_FRAMES
    dither: float = 0.0
    num_mel_bins: int = 80
    max_audio_frames: int = WhaleConfig().max_frames  # the speech encoder's limit (0: none), checked on the header
    # pixels: uint8 RGB tiles, normalised by the model on the device (a quarter of float32's host memory and
    # transfer); True: float32 normalised pixel values as the official processor gives them
    normalise: bool = False

    def tiles(self, src) -> np.ndarray:
        """An image (path, binary file object or PIL image) -> uint8 (or, normalised, float32)
        ``[tiles, 3, S, S]``."""
        return image_lib.preprocess_image(src, self.image, max_num=self.max_tiles, min_num=self.min_tiles,
                                          use_thumbnail=self.use_thumbnail, normalise=self.normalise)

    def frames(self, src) -> np.ndarray:
        """A video (path or binary file object) -> uint8 (or float32) ``[frames, 3, S, S]``, one tile a frame."""
        return video_lib.preprocess_video(src, self.image, self.video_fps, self.video_max_frames,
                                          self.video_min_frames, normalise=self.normalise)

    def fbank(self, src, sample_rate: Optional[int] = None) -> np.ndarray:
        """Audio (path, file object, or waveform with its rate) -> float32 fbank ``[frames, mel]``."""
        return audio_lib.audio_features(src, sample_rate, dither=self.dither, num_mel_bins=self.num_mel_bins,
                                        max_frames=self.max_audio_frames, min_frames=audio_lib.MIN_FRAMES)


def check_media(kind: str, src, decode: bool = True) -> None:
    """Raises the module's one-line error (``ImageError`` / ``AudioError`` / ``VideoError``, naming
    the file) unless ``src`` (a path or binary file object) is a usable ``kind`` ("image",
    "audio", "video"). ``decode``: decode it all (what ``write_tfds`` stores); else a cheap check
    (images are still decoded; audio: the header; video: the header and first frame)."""
    if kind == "image":
        image_lib.load_image(src)
    elif kind == "audio":
        (audio_lib.load_audio if decode else audio_lib.probe_audio)(src, min_frames=audio_lib.MIN_FRAMES)
    elif kind == "video":
        video_lib.read_frames(src) if decode else video_lib.probe_video(src)
    else:
        raise ValueError(f"unknown media kind {kind!r} (image, audio or video)")


def preprocess_settings(config) -> Preprocess:
    """The config's preprocessing (``config.image``, ``config.audio``): the only mapping from the
    config to preprocessing settings, used by training and inference alike."""
    im = config.image
    proc = image_lib.ImageProcessorConfig(size=int(im.size), crop_size=int(im.crop_size), mean=tuple(im.mean),
                                          std=tuple(im.std), resample=int(im.resample))
    return Preprocess(proc, int(im.max_dynamic_patch), int(im.min_dynamic_patch), bool(im.use_thumbnail),
                      float(im.video_fps), int(im.video_max_frames), int(im.video_min_frames),
                      float(config.audio.dither), int(config.audio.input_dim),
                      WhaleConfig(max_positions=int(config.audio.max_positions)).max_frames)


# ------------------------------------------------------------------------------ splicing
@dataclasses.dataclass
class SplicePlan:
    """Per spliced position (``[batch, length]``): ``kind`` (0 text, 1 image, 2 audio, -1 pad),
    ``text_ids`` (the id for text rows, else 0), ``src`` (row of the flattened image features
    ``[tiles * tokens_per_tile]`` or audio features ``[clips * audio_len]``), ``labels`` (or None)
    and ``lengths [batch]`` (real positions per row)."""
    kind: np.ndarray
    text_ids: np.ndarray
    src: np.ndarray
    labels: Optional[np.ndarray]
    lengths: np.ndarray

    @property
    def attention_mask(self) -> np.ndarray:
        return (self.kind != PAD).astype(np.int32)


def plan_splice(input_ids, attention_mask=None, labels=None, *, tokens_per_tile: int = 256,
                audio_llm_lengths: Sequence[int] = (), audio_len: int = 0, max_length: int = 6200,
                pad_to: Optional[int] = None, n_tiles: Optional[int] = None,
                audio_bases: Optional[Sequence[int]] = None) -> SplicePlan:
    """Host-side layout of the spliced batch. ``audio_len`` is the (padded) time axis of the audio
    features the model will produce (clip ``k`` starts at flat row ``k * audio_len``, or at
    ``audio_bases[k]`` when the clips sit in slots of several lengths); ``pad_to`` rounds the
    length up (jit buckets)."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    lab = None if labels is None else np.asarray(labels)
    rows, tile, clip = [], 0, 0
    for b in range(ids.shape[0]):
        row_ids = ids[b][mask[b]]
        row_lab = lab[b][mask[b]] if lab is not None else np.full(row_ids.shape, IGNORE_INDEX)
        kind, text, src, out_lab = [], [], [], []
        for t, tok in enumerate(row_ids):
            if tok == IMAGE_TOKEN_INDEX:
                if n_tiles is not None and tile >= n_tiles:
                    raise ValueError(f"row {b}: more <image> placeholders than the {n_tiles} image tiles given")
                kind += [IMAGE] * tokens_per_tile
                src += list(range(tile * tokens_per_tile, (tile + 1) * tokens_per_tile))
                text += [0] * tokens_per_tile
                out_lab += [IGNORE_INDEX] * tokens_per_tile
                tile += 1
            elif tok == AUDIO_TOKEN_INDEX:
                if clip >= len(audio_llm_lengths):
                    raise ValueError(f"row {b}: more <audio> placeholders than the "
                                     f"{len(audio_llm_lengths)} clips given")
                n = int(audio_llm_lengths[clip])
                base = clip * audio_len if audio_bases is None else int(audio_bases[clip])
                kind += [AUDIO] * n
                src += list(range(base, base + n))
                text += [0] * n
                out_lab += [IGNORE_INDEX] * n
                clip += 1
            elif tok < 0:
                raise ValueError(f"row {b}: unknown placeholder id {int(tok)} (only -200 image, -500 audio)")
            else:
                kind.append(TEXT)
                src.append(0)
                text.append(int(tok))
                out_lab.append(int(row_lab[t]))
        rows.append([np.asarray(a[:max_length]) for a in (kind, text, src, out_lab)])
    if n_tiles is not None and tile != n_tiles:
        raise ValueError(f"{n_tiles} image tiles given but the ids hold {tile} <image> placeholders")
    if clip != len(audio_llm_lengths):
        raise ValueError(f"{len(audio_llm_lengths)} audio clips given but the ids hold {clip} <audio> placeholders")
    lengths = np.asarray([len(r[0]) for r in rows], np.int32)
    L = int(lengths.max()) if len(rows) else 0
    if pad_to:
        L = round_up(max(L, 1), pad_to)
    out = [np.full((len(rows), L), fill, dtype) for fill, dtype in ((PAD, np.int8), (0, np.int32), (0, np.int32),
                                                                      (IGNORE_INDEX, np.int32))]
    for b, r in enumerate(rows):
        for arr, vals in zip(out, r):
            arr[b, :len(vals)] = vals
    return SplicePlan(out[0], out[1], out[2], out[3] if lab is not None else None, lengths)




def bucket(n: int, multiple: int = 1) -> int:
    """Next power of two >= n, rounded up to a multiple (the data-parallel size)."""
    b = max(1 << max(n - 1, 0).bit_length(), multiple)
    return round_up(b, multiple)


def build(input_ids, attention_mask, labels, pixels, clips: Sequence[np.ndarray], *, tokens_per_tile: int,
          max_length: int, pad_to: int, tile_slots: int, clip_slots: int, frame_slots: int,
          clip_lengths: Optional[Sequence[int]] = None, tile_offset: int = 0, clip_offset: int = 0,
          image_size: int = 0, mel_bins: int = 80, clip_groups: Optional[Sequence["ClipGroup"]] = None,
          clip_group_of: Optional[Sequence[int]] = None):
    """Model inputs of one batch -> ``(arrays, plan)``.

    ``input_ids`` / ``attention_mask`` / ``labels``: ``[B, L]`` (labels may be None); ``pixels``:
    the batch's tiles in placeholder order ``[n, 3, S, S]`` (None: no tiles), uint8 RGB tiles (the
    model normalises them) or float pixel values already normalised; ``pixels`` keeps that kind
    (uint8, else float32; uint8 without tiles); ``clips``: fbank
    clips ``[frames_i, mel]`` in placeholder order (``clip_lengths``: real frames of each, when the
    arrays are longer). Slots: tiles (``tile_slots``), clips (``clip_slots``) x frames
    (``frame_slots``) and the spliced length (rounded up to ``pad_to``) are zero-padded to these
    sizes (empty tile slots are ``image_size``-square); padding clips get length ``frame_slots``.
    ``tile_offset`` / ``clip_offset`` shift ``src`` into global tile / clip arrays (several processes
    feeding one batch). ``arrays`` holds
    ``kind``, ``text_ids``, ``src``, ``labels`` (with labels), ``pixels`` and ``audio_feats`` /
    ``audio_lens`` (None when there are no slots of that kind).

    ``clip_groups`` (packing's audio budget) replaces the one ``clip_slots x frame_slots`` array by
    one array per group of slots (each its own length; ``clip_group_of[k]``: clip ``k``'s group,
    slots filled in clip order): ``audio_feats`` / ``audio_lens`` are then lists, one per group."""
    n_tiles = 0 if pixels is None else len(pixels)
    lens = [len(c) for c in clips] if clip_lengths is None else [int(n) for n in clip_lengths]
    grouped = clip_groups is not None
    if not grouped:
        clip_groups = [ClipGroup(frame_slots, clip_slots, 0, clip_offset)] if clip_slots else []
        clip_group_of = [0] * len(clips)
    used = [0] * len(clip_groups)
    slot_of = []
    for k, g in enumerate(clip_group_of):
        if g >= len(clip_groups) or used[g] >= clip_groups[g].slots or lens[k] > clip_groups[g].frames:
            used = None
            break
        slot_of.append(used[g])
        used[g] += 1
    if n_tiles > tile_slots or used is None:
        raise ValueError(f"{n_tiles} tiles / {len(clips)} clips of up to {max(lens, default=0)} frames do not fit "
                         f"{tile_slots} tile slots and clip slots {[(g.slots, g.frames) for g in clip_groups]}")
    bases = [clip_groups[g].row(s) for g, s in zip(clip_group_of, slot_of)]
    plan = plan_splice(input_ids, attention_mask, labels, tokens_per_tile=tokens_per_tile,
                       audio_llm_lengths=[int(llm_length(n)) for n in lens], max_length=max_length, pad_to=pad_to,
                       n_tiles=n_tiles, audio_bases=bases)
    plan.src[plan.kind == IMAGE] += tile_offset * tokens_per_tile
    px = None
    if tile_slots:
        dtype = np.float32 if n_tiles and np.asarray(pixels).dtype != np.uint8 else np.uint8
        px = np.zeros((tile_slots,) + (tuple(np.shape(pixels)[1:]) if n_tiles else (3, image_size, image_size)), dtype)
        if n_tiles:
            px[:n_tiles] = pixels
    feats = [np.zeros((g.slots, g.frames, mel_bins), np.float32) for g in clip_groups]
    audio_lens = [np.full((g.slots,), g.frames, np.int32) for g in clip_groups]
    for k, (c, g, s) in enumerate(zip(clips, clip_group_of, slot_of)):
        n = min(len(c), clip_groups[g].frames)
        feats[g][s, :n] = c[:n]
        audio_lens[g][s] = lens[k]
    if not grouped:
        feats, audio_lens = (feats[0], audio_lens[0]) if clip_groups else (None, None)
    arrays = dict(kind=plan.kind, text_ids=plan.text_ids, src=plan.src, pixels=px, audio_feats=feats,
                  audio_lens=audio_lens)
    if plan.labels is not None:
        arrays["labels"] = plan.labels
    return arrays, plan


@dataclasses.dataclass(frozen=True)
class ClipGroup:
    """One array of clip slots ``[slots, frames, mel]``: ``base`` = the flat adapter row where the
    group's *global* slot 0 starts (the groups of all processes laid end to end), ``first`` = this
    process's first global slot in it."""
    frames: int
    slots: int
    base: int = 0
    first: int = 0

    def row(self, slot: int) -> int:
        """Flat adapter row of this process's ``slot``."""
        return self.base + (self.first + slot) * int(llm_length(self.frames))


def concat_tiles(pixels: Sequence[np.ndarray], image_size: int) -> np.ndarray:
    """Examples' tiles ``[n_i, 3, S, S]`` -> one array in their order (empty uint8 when none); all
    uint8 tiles or all float pixel values, never both (their values mean different things)."""
    if len({np.asarray(p).dtype == np.uint8 for p in pixels}) > 1:
        raise ValueError("a batch mixes uint8 tiles and float pixel values: preprocess its examples alike")
    return np.concatenate(pixels) if len(pixels) else np.zeros((0, 3, image_size, image_size), np.uint8)


def example_tiles(ex) -> int:
    """Tiles (image tiles and video frames) of an example."""
    return 0 if ex.get("pixels") is None else len(ex["pixels"])


def example_clips(ex) -> list:
    """The fbank clips of an example (``audio``: one clip or a list)."""
    a = ex.get("audio")
    return [] if a is None else (a if isinstance(a, list) else [a])


def spliced_length(ex, tokens_per_tile: int) -> int:
    """Positions an example takes once its placeholders are replaced by tile and clip rows."""
    return len(ex["input_ids"]) + example_tiles(ex) * (tokens_per_tile - 1) + \
        sum(int(llm_length(len(a))) - 1 for a in example_clips(ex))


def example_problem(ex, tokens_per_tile: int, seq_len: int, max_frames: int) -> Optional[str]:
    """Why an example can never be trained on with these limits (None if it can)."""
    ids = np.asarray(ex["input_ids"])
    n_img, n_aud = int((ids == IMAGE_TOKEN_INDEX).sum()), int((ids == AUDIO_TOKEN_INDEX).sum())
    tiles, clips = example_tiles(ex), example_clips(ex)
    if n_img != tiles or n_aud != len(clips):
        return f"{n_img} <image> / {n_aud} <audio> placeholders for {tiles} tiles / {len(clips)} clips"
    n = spliced_length(ex, tokens_per_tile)
    if n > seq_len:
        return f"{n} spliced positions > seq_len {seq_len}"
    if any(len(a) > max_frames for a in clips):
        return f"audio over {max_frames} frames"
    return None


def pad_rows(examples: Sequence[dict], rows: Optional[int] = None):
    """``input_ids`` / ``labels`` of examples as right-padded ``[rows, L]`` arrays (labels -100 on
    padding) and the mask of real positions; rows past the examples are all padding."""
    rows = len(examples) if rows is None else rows
    width = max([len(e["input_ids"]) for e in examples] + [1])
    ids = np.zeros((rows, width), np.int64)
    labels = np.full((rows, width), IGNORE_INDEX, np.int64)
    mask = np.zeros((rows, width), bool)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = e["input_ids"], e["labels"], True
    return ids, labels, mask


class LMCollator:
    """Examples (``input_ids``, ``labels``, ``pixels [tiles, 3, S, S]``, ``audio``: fbank clips) ->
    one static-shape batch for the LM stages: tiles padded to ``max_tiles``, clips to
    ``max_clips`` x ``max_frames``, the spliced sequence to ``seq_len``, rows to the number of
    examples. Examples that do not fit (and bad ones, ``{"id", "bad"}``) are replaced by
    all-padding rows (counted in ``skipped`` and logged with their id), so every batch has the same
    shape. With several processes each collates its own rows; ``tile_offset`` / ``clip_offset``
    (this process's first slot in the *global* tile / clip arrays) make ``src`` index the global
    arrays that ``jax.make_array_from_process_local_data`` assembles.

    ``shards`` (the batch shards of this process's devices): the rows, tile slots and clip slots split evenly
    over them and each shard's rows keep their media in its own slots (:mod:`vita_jax.data.shards`), so the
    model splices on each chip alone."""

    def __init__(self, tokens_per_tile: int, seq_len: int, max_tiles: int, max_clips: int, max_frames: int,
                 image_size: int, tile_offset: int = 0, clip_offset: int = 0, shards: int = 1):
        if max_tiles % shards or max_clips % shards:
            raise ValueError(f"{max_tiles} tile / {max_clips} clip slots do not split over {shards} batch shards")
        self.tpt, self.seq_len, self.max_tiles, self.max_clips, self.max_frames = (tokens_per_tile, seq_len, max_tiles,
                                                                                    max_clips, max_frames)
        self.s, self.tile_offset, self.clip_offset, self.shards = image_size, tile_offset, clip_offset, shards
        self.skipped: dict[str, str] = {}

    def __call__(self, examples):
        n, k = len(examples), self.shards
        if k == 1 or n % k:
            return self._collate(examples, self.max_tiles, self.max_clips, self.tile_offset, self.clip_offset)
        tiles, clips = self.max_tiles // k, self.max_clips // k
        parts = [self._collate(examples[j * n // k:(j + 1) * n // k], tiles, clips, self.tile_offset + j * tiles,
                               self.clip_offset + j * clips) for j in range(k)]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def _collate(self, examples, max_tiles: int, max_clips: int, tile_offset: int, clip_offset: int) -> dict:
        kept, pixels, clips = [], [], []
        for ex in examples:
            if "bad" in ex:
                self.skipped[str(ex.get("id", "?"))] = ex["bad"]  # ids of any JSON type are report keys
                continue
            n_tiles, ex_clips = example_tiles(ex), example_clips(ex)
            problem = example_problem(ex, self.tpt, self.seq_len, self.max_frames)
            if problem is None and (sum(len(p) for p in pixels) + n_tiles > max_tiles
                                    or len(clips) + len(ex_clips) > max_clips):
                problem = "media over the batch bucket"
            if problem:
                self.skipped[ex.get("id", "?")] = problem
                log.warning("skipping sample %s: %s", ex.get("id", "?"), problem)
                continue
            kept.append(ex)
            if n_tiles:
                pixels.append(ex["pixels"])
            clips += ex_clips
        # bad examples leave all-padding rows: one static shape
        id_arr, lab_arr, mask = pad_rows(kept, len(examples))
        px = concat_tiles(pixels, self.s)
        arrays, _ = build(id_arr, mask, lab_arr, px, clips, tokens_per_tile=self.tpt, max_length=self.seq_len,
                          pad_to=self.seq_len, tile_slots=max_tiles, clip_slots=max_clips,
                          frame_slots=self.max_frames, tile_offset=tile_offset, clip_offset=clip_offset,
                          image_size=self.s)
        # static shapes even with no slots of a kind: empty arrays, never None
        if arrays["pixels"] is None:
            arrays["pixels"] = concat_tiles([], self.s)
        if arrays["audio_feats"] is None:
            arrays["audio_feats"] = np.zeros((0, self.max_frames, 80), np.float32)
            arrays["audio_lens"] = np.zeros((0,), np.int32)
        return arrays
