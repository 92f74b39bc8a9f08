"""The data settings a stage reads (``config.data``), each checked before anything is built: its type, its
range or its allowed values, in one line naming the field (``config.data.audio_buckets[1] = ...``).

:func:`check` covers every ``config.data`` field the data path reads: the LM stages' (sequence length,
media budgets per sample, packing and its budgets, the mixture and TFDS entries, the pipeline's threads)
and stage 3.1's (its wav lists and held-out evaluation). A field a config does not have (an older stage
file) keeps its default and is not checked."""
from __future__ import annotations

import math

MIXTURE_KEYS = ("json", "weight", "media_root", "sets", "allow_outside_root")
TFDS_KEYS = ("name", "split", "data_dir", "weight")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(least: int):
    return lambda v: _is_int(v) and v >= least, f"an integer >= {least}"


def _number_above(low: float):
    return (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > low,
            f"a finite number > {low:g}")


_BOOL = (lambda v: isinstance(v, bool), "true or false")
_STR = (lambda v: isinstance(v, str), "a string")

# field -> (test, what it must be)
LM_FIELDS = {
    "seq_len": _int(1), "max_tiles_per_sample": _int(0), "max_clips_per_sample": _int(0), "max_frames": _int(1),
    "shuffle_seed": _int(0), "synthetic_size": _int(1), "calibration_examples": _int(1), "tile_budget": _int(0),
    "workers": _int(0), "prefetch": _int(0), "packing": _BOOL, "allow_outside_media_root": _BOOL,
    "tokenizer": _STR, "budgets": (lambda v: v in ("auto", "fixed"), "'auto' or 'fixed'"),
}
CODEC_FIELDS = {"heldout_every": _int(0), "heldout_seconds": _number_above(0), "prefetch": _int(0)}


def _as_list(v):
    """A list or tuple (ml_collections keeps lists of lists as given) -> a list; anything else None."""
    return list(v) if isinstance(v, (list, tuple)) else None


def _check_audio_buckets(v, max_frames) -> None:
    """``[[frames, slots], ...]``: frames in 1..``data.max_frames``, slots >= 1, no frames twice."""
    what = "a list of [frames, slots] pairs, e.g. [[1000, 4], [3000, 2]]"
    rows = _as_list(v)
    if rows is None:
        raise ValueError(f"config.data.audio_buckets = {v!r}: must be {what} ([]: one bucket of max_frames)")
    for k, pair in enumerate(rows):
        pair = _as_list(pair)
        if pair is None or len(pair) != 2 or not all(_is_int(x) for x in pair):
            raise ValueError(f"config.data.audio_buckets[{k}] = {rows[k]!r}: must be [frames, slots], two integers "
                             f"(the field: {what})")
        frames, slots = pair
        if not 1 <= frames <= (max_frames if _is_int(max_frames) else frames):
            raise ValueError(f"config.data.audio_buckets[{k}] = {pair}: frames {frames} must be in 1 .. "
                             f"config.data.max_frames = {max_frames}")
        if slots < 1:
            raise ValueError(f"config.data.audio_buckets[{k}] = {pair}: slots {slots} must be at least 1")
    frames = [int(p[0]) for p in rows]
    if len(set(frames)) < len(frames):
        raise ValueError(f"config.data.audio_buckets = {rows}: a frames length given twice")


def _check_entries(name: str, entries, keys: tuple, required: str) -> None:
    """``config.data.mixture`` / ``tfds``: a list of objects with ``required`` (a non-empty string), only
    ``keys``, a weight > 0 and string paths."""
    rows = _as_list(entries)
    if rows is None:
        raise ValueError(f"config.data.{name} = {entries!r}: must be a list of {{{required!r}: ..., ...}} objects")
    for k, e in enumerate(rows):
        where = f"config.data.{name}[{k}]"
        e = e.to_dict() if hasattr(e, "to_dict") else e
        if not isinstance(e, dict) or not isinstance(e.get(required), str) or not e[required].strip():
            raise ValueError(f"{where} = {e!r}: each entry needs a {required!r} key (a non-empty string)")
        unknown = sorted(set(e) - set(keys))
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(keys)})")
        w = e.get("weight", 1.0)
        if not _number_above(0)[0](w):
            raise ValueError(f"{where}: weight {w!r} must be a number > 0")
        for key in ("media_root", "split", "data_dir"):
            if e.get(key) is not None and not isinstance(e[key], str):
                raise ValueError(f"{where}: {key} {e[key]!r} must be a string")
        if e.get("sets") is not None and not isinstance(e["sets"], dict):
            raise ValueError(f"{where}: sets {e['sets']!r} must be an object of set name -> folder")
        if e.get("allow_outside_root") is not None and not isinstance(e["allow_outside_root"], bool):
            raise ValueError(f"{where}: allow_outside_root {e['allow_outside_root']!r} must be true or false")


def _check_wav_lists(d) -> None:
    for field in ("train", "heldout"):
        v = d.get(field)
        rows = _as_list(v) if v is not None else []
        if rows is None or not all(isinstance(x, str) and x.strip() for x in rows):
            raise ValueError(f"config.data.{field} = {v!r}: must be a list of wav folders, .lst lists or .wav files "
                             f"(e.g. --config.data.{field}='[\"wavs/\"]')")


def check(config) -> None:
    """Raises a ``ValueError`` naming the first ``config.data`` field of the wrong type, out of range or
    not one of its allowed values (stage 3.1's fields for ``loss = "codec"``, else the LM stages')."""
    d = config.get("data")
    if d is None:
        return
    codec = config.get("loss") == "codec"
    for field, (ok, what) in (CODEC_FIELDS if codec else LM_FIELDS).items():
        if field in d and not ok(d[field]):
            raise ValueError(f"config.data.{field} = {d[field]!r}: must be {what}")
    if codec:
        _check_wav_lists(d)
        return
    if "audio_buckets" in d:
        _check_audio_buckets(d["audio_buckets"], d.get("max_frames"))
    for name, keys, required in (("mixture", MIXTURE_KEYS, "json"), ("tfds", TFDS_KEYS, "name")):
        if name in d:
            _check_entries(name, d[name], keys, required)
