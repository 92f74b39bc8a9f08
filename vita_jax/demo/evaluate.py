"""Held-out metrics of the demo's stages.

* LM stages: the fraction of held-out samples whose whole reply (every target token and the final
  ``<|im_end|>``) is the argmax under teacher forcing, which is exactly "greedy decoding
  reproduces the reply" (greedy decoding feeds back the same tokens), computed in one batched
  forward instead of a decode loop.
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
from vita_jax.models import ctc as ctc_lib
from vita_jax.models import vita
from vita_jax.models.vita import IGNORE_INDEX, VITA
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


def reply_accuracy(config, params, batches) -> tuple[float, float]:
    """``(exact-match rate of the replies, token accuracy)`` over ``batches`` (collated LM
    batches; all-padding rows of skipped samples are not counted). Token accuracy: the fraction of
    reply tokens that are the argmax given the true prefix."""
    fwd = _lm_forward(_model_key(config))
    p = {k: params[k] for k in ("llm", "vision_tower", "mm_projector", "audio_encoder") if k in params}
    hits = total = tok_hits = tok_total = 0
    for b in batches:
        logits = fwd(p, jax.tree.map(jnp.asarray, b))
        pred = np.asarray(jnp.argmax(logits[:, :-1], -1))
        tgt = np.asarray(b["labels"])[:, 1:]
        valid = tgt != IGNORE_INDEX
        rows = valid.any(1)
        ok = ((pred == tgt) | ~valid).all(1)
        hits += int((ok & rows).sum())
        total += int(rows.sum())
        tok_hits += int(((pred == tgt) & valid).sum())
        tok_total += int(valid.sum())
    return hits / max(total, 1), tok_hits / max(tok_total, 1)


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
