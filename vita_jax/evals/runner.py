"""One evaluator run: settings -> examples -> batched replies -> per-example scores -> metrics, and
the files it writes (``predictions.jsonl``, ``metrics.json``).

Settings of an evaluator (``config.evals[NAME]`` in training, ``vita-jax eval`` on a checkpoint):
``type`` (a task of :mod:`vita_jax.evals.tasks`), ``data`` (its file or folder), ``max_examples``
(0 = all; MCQ counts questions, not rotations), ``batch_size`` (rows of a global batch),
``max_new_tokens``, ``do_sample`` / ``temperature`` / ``top_k`` / ``top_p`` / ``seed`` (greedy by
default), ``every`` (training only: steps between runs; 0 = only at the end) and the task's own
(``prompt``, ``prompt_suffix``, ``language``, ``circular``, ``frames``).
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping, Optional

import ml_collections
from tqdm import tqdm

from vita_jax import config as config_lib
from vita_jax.data import batch as batch_lib
from vita_jax.data import sources
from vita_jax.evals import readers, tasks
from vita_jax.evals.engine import EvalEngine
from vita_jax.infer import generate as gen_lib

DEFAULTS = dict(type="", data="", every=0, max_examples=0, batch_size=8, max_new_tokens=64, do_sample=False,
                temperature=1.0, top_k=0, top_p=1.0, seed=0, prompt="", prompt_suffix=tasks.VQA_SUFFIX,
                language="en", circular=False, frames=16)


def settings_of(raw: Mapping, name: str = "eval") -> dict:
    """An evaluator's settings with the defaults filled in; an unknown key, a missing ``type`` /
    ``data`` or a bad number is a ``ValueError`` naming it."""
    raw = dict(raw.to_dict() if hasattr(raw, "to_dict") else raw)
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{name}: unknown setting {unknown[0]!r} (settings: {', '.join(DEFAULTS)})")
    s = {**DEFAULTS, **raw}
    tasks.get(s["type"])
    if not s["data"]:
        raise ValueError(f"{name}: no data (the benchmark's file or folder)")
    if not os.path.exists(s["data"]):
        raise FileNotFoundError(f"{name}: data {s['data']} does not exist")
    for k, least in (("batch_size", 1), ("max_new_tokens", 1), ("frames", 1), ("every", 0), ("max_examples", 0),
                     ("seed", 0)):
        if isinstance(s[k], bool) or not isinstance(s[k], int) or s[k] < least:
            raise ValueError(f"{name}: {k} = {s[k]!r} must be an integer >= {least}")
    for k, kind in (("prompt", str), ("prompt_suffix", str), ("language", str), ("circular", bool),
                    ("do_sample", bool)):
        if not isinstance(s[k], kind):
            raise ValueError(f"{name}: {k} = {s[k]!r} must be {'a string' if kind is str else 'true or false'}")
    try:  # the sampling settings as generation checks them, before any model is loaded
        gen_lib.check_sampling(s["max_new_tokens"], s["do_sample"], s["temperature"], s["top_k"], s["top_p"])
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    return s


def _limit(examples: list, n: int) -> list:
    """The first ``n`` examples, or all examples of the first ``n`` groups (circular copies)."""
    if not n:
        return examples
    if not any("group" in e for e in examples):
        return examples[:n]
    keep = set()
    for e in examples:
        if len(keep) < n:
            keep.add(e["group"])
    return [e for e in examples if e["group"] in keep]


def _record(ex: dict, prediction: str, scores: dict) -> dict:
    rec = dict(id=ex["id"], prediction=prediction, reference=ex["reference"])
    rec.update({k: ex[k] for k in ("category", "group", "image_key") if k in ex})
    rec.update(scores)
    return rec


def check_media(examples: list) -> None:
    """Every example's media usable (images decoded; audio: the header; video: the header and first frame),
    each distinct file or image once; an error names the example's file and row (``where``) and the medium."""
    seen = set()
    for ex in examples:
        where = ex.get("where") or f"example {ex['id']}"
        for kind in ("image", "audio", "video"):
            media = ex.get(kind)
            if media is None or (kind, media) in seen:
                continue
            seen.add((kind, media))
            try:
                batch_lib.check_media(kind, readers.as_file(media, f"{where} {kind}"), decode=False)
            except (ValueError, OSError) as e:
                raise readers.located(where, e) from None


def read_data(settings: Mapping, name: str = "eval", check: bool = True):
    """What an evaluator runs on, read before any model is used: its examples (after ``max_examples``;
    ``check``: their media opened, :func:`check_media`) or, for ``loss``, the official JSON source (its
    shape checked). A reader's error names the file and the line or row."""
    s = settings_of(settings, name)
    task = tasks.get(s["type"])
    if not task.generative:
        # an evaluation file is the user's own, named on the command line: its media may lie anywhere
        # (containment guards training data and what write_tfds copies)
        return sources.OfficialJSON(s["data"], allow_outside_root=True)
    examples = _limit(task.read(s), int(s["max_examples"]))
    if not examples:
        raise ValueError(f"{name}: {s['data']} holds no examples")
    if check:
        check_media(examples)
    return examples


def read_suite(suite: Mapping) -> dict:
    """``{name: data}`` of every evaluator (:func:`read_data`): all of a suite's data checked before the
    first evaluator runs."""
    return {name: read_data(s, name) for name, s in suite.items()}


def evaluate(engine: EvalEngine, settings: Mapping, name: str = "eval", progress: bool = False,
             data=None) -> tuple[dict, list]:
    """Runs one evaluator -> ``(metrics, per-example records)``; every process returns the same.
    ``metrics`` holds the task's numbers plus ``n`` (examples) and ``examples_per_s``. ``data``: what
    :func:`read_data` returned for it (default: read now)."""
    s = settings_of(settings, name)
    task = tasks.get(s["type"])
    data = read_data(s, name) if data is None else data
    t0 = time.perf_counter()
    records = []
    if task.generative:
        examples = data
        sampling = {k: s[k] for k in ("do_sample", "temperature", "top_k", "top_p", "seed")}
        # the bar is closed on an error too: the error line never shares its terminal line
        with tqdm(total=len(examples), unit="ex", desc=name, disable=not progress, leave=False) as bar:
            for texts in engine.generate(examples, int(s["batch_size"]), int(s["max_new_tokens"]),
                                         frames=int(s["frames"]) if s["type"] == "video_mcq" else None,
                                         progress=bar, **sampling):
                for text in texts:
                    ex = examples[len(records)]
                    records.append(_record(ex, text, task.score(ex, text, s)))
    else:
        src = data
        n = len(src) if not s["max_examples"] else min(len(src), int(s["max_examples"]))
        ids = [str(src[i].get("id", i)) if isinstance(src[i], dict) else str(i) for i in range(n)]
        convert = sources.OfficialExamples(engine.tokenizer, engine.prep)
        with tqdm(total=n, unit="ex", desc=name, disable=not progress, leave=False) as bar:
            for recs in engine.loss(ids, lambda i: convert(src[i]), int(s["batch_size"]), progress=bar):
                records.extend(recs)
    dt = time.perf_counter() - t0
    metrics = task.aggregate(records, s)
    metrics.update(n=len(records), examples_per_s=len(records) / dt if dt > 0 else float("nan"))
    return metrics, records


def _clean(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def write_predictions(path: str, records: list, opener=open) -> None:
    """One JSON line per example (``id``, ``prediction``, ``reference``, its scores)."""
    with opener(path, "w") as f:
        for r in records:
            f.write(json.dumps({k: _clean(v) for k, v in r.items()}, ensure_ascii=False) + "\n")


def write_outputs(out_dir: str, task: str, metrics: dict, records: list) -> dict:
    """``OUT/predictions.jsonl`` and ``OUT/metrics.json``; returns the summary ``{task, n, metrics}``."""
    os.makedirs(out_dir, exist_ok=True)
    write_predictions(os.path.join(out_dir, "predictions.jsonl"), records)
    summary = dict(task=task, n=metrics["n"], metrics={k: _clean(v) for k, v in metrics.items()})
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def suite(config) -> dict:
    """``config.evals`` (``{name: settings}``) as checked settings, in name order."""
    evals = config.get("evals") if hasattr(config, "get") else None
    if not evals:
        return {}
    return {name: settings_of(evals[name], f"config.evals.{name}") for name in sorted(evals)}


def log_line(task: str, metrics: dict) -> str:
    """The closing JSON line ``{"task", "n", "metrics"}``."""
    return json.dumps(dict(task=task, n=metrics["n"], metrics={k: _clean(v) for k, v in metrics.items()}))


def step_due(settings: dict, step: int, total: int) -> bool:
    """In training: every ``every`` steps and at the last step."""
    every = int(settings.get("every", 0))
    return step == total or (every > 0 and step % every == 0)


def read_examples(settings: Mapping, name: str = "eval") -> Optional[list]:
    """The examples an evaluator would run (after ``max_examples``), None for ``loss``."""
    s = settings_of(settings, name)
    task = tasks.get(s["type"])
    return _limit(task.read(s), int(s["max_examples"])) if task.generative else None


def suite_from_args(config_file, task, data, rest, **options) -> dict:
    """``{name: settings}`` of ``vita-jax eval``: ``--task`` + ``--data`` (``rest``: ``--config.FIELD=V``
    set that evaluator's settings), or ``--config=FILE`` with ``config.evals``; checked before loading.
    ``options``: command-line settings for every task (``max_examples``, ``batch_size``, ...)."""
    if config_file is None and not (task and data):
        raise ValueError("give --task and --data, or --config=eval_vita15[:ROOT] (or FILE.py) for a suite")
    if config_file is not None:
        if task or data:
            raise ValueError("--config=FILE names its tasks and data: drop --task / --data")
        config = config_lib.load_config(config_file)
        if not config.get("evals"):
            raise ValueError(f"--config={config_file}: no config.evals (a suite: {{name: dict(type=..., data=...)}})")
        for name in list(config.evals):  # every setting present, so --config.evals.NAME.FIELD can set it
            config.evals[name] = ml_collections.ConfigDict({**DEFAULTS, **dict(config.evals[name])})
    else:
        config = ml_collections.ConfigDict({**DEFAULTS, "type": task, "data": data})
    for arg in rest:
        if not arg.startswith("--config."):
            raise ValueError(f"vita-jax eval: unrecognized argument: {arg}")
        key, sep, val = arg[len("--config."):].partition("=")
        if not sep:
            raise ValueError(f"{arg}: give a value, --config.{key}=VALUE")
        config_lib.apply_override(config, key, val)
    out = suite(config) if config_file is not None else {task: settings_of(config, f"--task {task}")}
    for name, s in out.items():
        for opt, value in options.items():  # --max-examples, --batch-size, --max-new-tokens
            if value is not None:
                s[opt] = value
        out[name] = settings_of(s, name)
    return out
