"""Held-out metrics of the demo's stages.

* LM stages: the fraction of held-out samples whose whole reply (every target token and the final
  ``<|im_end|>``) is the argmax under teacher forcing, which is exactly "greedy decoding
  reproduces the reply" (greedy decoding feeds back the same tokens), computed in one batched
  forward instead of a decode loop and scored by the library's held-out evaluator (``loss``).
* CTC (2.1a): character error rate of greedy CTC decoding.
* Speech decoder (3.2): teacher-forced speech-token (codec id) accuracy.
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vita_jax.data.units import cer
from vita_jax.evals import tasks
from vita_jax.evals.engine import row_loss_terms
from vita_jax.models import ctc as ctc_lib
from vita_jax.models import vita
from vita_jax.models.vita import VITA
from vita_jax.train.step import make_loss


@functools.lru_cache(maxsize=4)
def _lm_forward(model_json: str):
    module = VITA.from_config(ml_collections.ConfigDict(json.loads(model_json)))
    return jax.jit(lambda p, b: module.apply({"params": p}, b["kind"], b["text_ids"], b["src"], b["pixels"],
                                             b["audio_feats"], b["audio_lens"]))


def _model_key(config) -> str:
    c = config.copy_and_resolve_references()
    keep = {k: c[k] for k in ("llm", "vision", "audio", "image", "mm_hidden_size", "dtype", "param_dtype",
                              "remat_policy", "attention_impl", "has_vision", "has_audio") if k in c}
    return json.dumps({k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in keep.items()},
                                    sort_keys=True)


def reply_accuracy(config, params, batches) -> tuple[float, float, float]:
    """``(exact-match rate of the replies, token accuracy, NLL in nats per reply token)`` over ``batches``
    (collated LM batches; all-padding rows of skipped samples are not counted), scored by the library's
    held-out evaluator (:mod:`vita_jax.evals`: per-row loss terms, the ``loss`` task's metrics).
    Token accuracy: the fraction of reply tokens that are the argmax given the true prefix."""
    fwd = _lm_forward(_model_key(config))
    p = {k: params[k] for k in ("llm", "vision_tower", "mm_projector", "audio_encoder") if k in params}
    records = []
    for b in batches:
        nll, count, hits = (np.asarray(x) for x in row_loss_terms(fwd(p, jax.tree.map(jnp.asarray, b)),
                                                                   jnp.asarray(b["labels"])))
        records += [dict(nll=float(n), tokens=int(c), correct=int(h)) for n, c, h in zip(nll, count, hits)]
    m = tasks.get("loss").aggregate(records, {})
    return m["reply_exact"], m["token_accuracy"], m["loss"]


def ctc_cer(config, params, batch, vocab) -> float:
    """CER of greedy CTC decoding on one batch (``feats``, ``lengths``, ``labels``, ``label_mask``)."""
    module = ctc_lib.WhaleCTC(vita.audio_config(config), int(config.ctc_units))
    p = {"encoder": params["audio_encoder"]["encoder"], "ctc": params["ctc"]}
    logits, mask = module.apply({"params": p}, jnp.asarray(batch["feats"]), jnp.asarray(batch["lengths"]))
    hyps = [vocab.decode(h) for h in ctc_lib.greedy_decode(logits, np.asarray(mask).sum(-1))]
    refs = [vocab.decode([int(t) for t, m in zip(row, mrow) if m])
            for row, mrow in zip(np.asarray(batch["labels"]), np.asarray(batch["label_mask"]))]
    return cer(refs, hyps)


def speech_token_accuracy(config, params, batch) -> float:
    """Teacher-forced codec-id accuracy of the speech decoder on one batch."""
    _, (count, correct) = make_loss(config)(params, jax.tree.map(jnp.asarray, batch))
    return float(correct) / max(float(count), 1.0)


def gain(row: dict) -> float:
    """How much a stage's held-out metric improved (positive = better, whichever way the metric points)."""
    return row["after"] - row["before"] if row["higher_is_better"] else row["before"] - row["after"]


def format_summary(s: dict) -> str:
    """The summary table (every stage run; the export and the spoken answer when the demo got that far)."""
    w = max([26] + [len(r["metric"]) for r in s["stages"]])
    lines = ["", "VITA-1.5 demo summary (tiny model, CPU)",
             f"{'stage':6} {'metric':{w}} {'before':>8} {'after':>8} {'gain':>7}  better", "-" * (w + 42)]
    for r in s["stages"]:
        lines.append(f"{r['stage']:6} {r['metric']:{w}} {r['before']:8.3f} {r['after']:8.3f} {gain(r):7.3f}  "
                     f"{'yes' if gain(r) > 0 else 'NO'}")
    lines += ["-" * (w + 42), f"speech: {s['speech']}"] + ([f"codec: {s['codec']}"] if s.get("codec") else [])
    if "export" in s:
        same = "identical" if s["export_round_trip_identical"] else "DIFFERENT"
        lines += [f"export: {s['export']} (round trip {same})",
                  f"spoken answer: {s['answer']['text']!r} -> {s['answer']['wav']}"]
    lines.append(f"total: {s['total_seconds'] / 60:.1f} min (budget {s['budget_minutes']} min)")
    return "\n".join(lines)
