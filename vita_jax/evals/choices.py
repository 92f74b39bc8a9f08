"""Scores of closed answers, as VLMEvalKit scores them by exact matching (no external judge).

* :func:`infer_option`: which option a reply names, VLMEvalKit's ``can_infer``: first an option
  letter standing alone among the reply's words (punctuation ``.()[],:;!*#{}`` split words; exactly
  one letter named; a lone ``A`` in a reply of more than 3 words is an article, not an answer;
  ``Z`` or a known refusal means "none"), else the one option whose text the reply contains.
* :func:`circular_groups`: MMBench's circular evaluation: a question counts only when every
  rotation of its options is answered correctly.
* :func:`yes_no`: the MME reply as Yes / No / Unknown (one of the words present, not both).
* :func:`mme_scores`: per sub-task accuracy (questions) and accuracy+ (images with both questions
  right), each in percent; a sub-task scores acc + acc+ (max 200); perception = the 10
  perception sub-tasks, cognition = the 4 reasoning ones, MME score = the sum over all sub-tasks
  (perception + cognition on MME, max 2800).
"""
from __future__ import annotations

import collections
from typing import Mapping, Optional, Sequence

from vita_jax.evals.text_metrics import punctuation

_SPLIT = ".()[],:;!*#{}"
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def infer_letter(reply: str, letters: Sequence[str]) -> Optional[str]:
    """The option letter a reply names on its own, ``"Z"`` for none / a refusal, else None."""
    if any(r in reply for r in _REFUSALS):
        return "Z"
    text = reply
    for c in _SPLIT:
        text = text.replace(c, " ")
    words = text.split()
    named = [c for c in letters if c in words]
    if len(named) == 1:
        if "A" in words and len(words) > 3:  # "A" may be the article: not an answer
            return None
        return named[0]
    if not named and "Z" in words:
        return "Z"
    return None


def infer_text(reply: str, options: Mapping[str, str]) -> Optional[str]:
    """The one option whose text (case-insensitive) the reply contains, else None."""
    low = reply.lower()
    hits = [k for k, v in options.items() if str(v).lower() in low]
    return hits[0] if len(hits) == 1 else None


def infer_option(reply: str, options: Mapping[str, str]) -> Optional[str]:
    """The option letter of ``reply`` (``options``: letter -> text), ``"Z"`` for none, None when it
    cannot be told by exact matching."""
    reply = str(reply)
    return infer_letter(reply, list(options)) or infer_text(reply, options)


def rotations(options: Mapping[str, str], answer: str) -> list[tuple[dict, str]]:
    """The circular copies of a question: the option texts shifted by 0..n-1 places over the same
    letters, each with the letter where the right text lands."""
    letters, texts = list(options), list(options.values())
    right = texts[letters.index(answer)]
    out = []
    for k in range(len(texts)):
        shifted = texts[k:] + texts[:k]
        out.append((dict(zip(letters, shifted)), letters[shifted.index(right)]))
    return out


def circular_groups(records: Sequence[dict]) -> tuple[float, int]:
    """``(circular accuracy, questions)`` from per-copy records ``{"group", "hit"}``: a group is
    right only when all its copies are."""
    groups = collections.defaultdict(list)
    for r in records:
        groups[r["group"]].append(bool(r["hit"]))
    return (sum(all(v) for v in groups.values()) / len(groups) if groups else float("nan")), len(groups)


def yes_no(reply: str) -> str:
    """``"Yes"`` / ``"No"`` when exactly one of the words appears in the reply, else ``"Unknown"``."""
    words = punctuation(reply.lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return "Unknown"


def mme_scores(records: Sequence[dict]) -> dict:
    """MME from per-question records ``{"category", "image", "hit"}`` -> ``{category/acc,
    category/acc_plus, category/score, perception, cognition, mme_score}`` (percentages)."""
    per = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in records:
        per[r["category"]][r["image"]].append(bool(r["hit"]))
    out = {}
    for cat, images in sorted(per.items()):
        hits = [h for v in images.values() for h in v]
        acc = 100.0 * sum(hits) / len(hits)
        acc_plus = 100.0 * sum(all(v) for v in images.values()) / len(images)
        out[f"{cat}/acc"], out[f"{cat}/acc_plus"], out[f"{cat}/score"] = acc, acc_plus, acc + acc_plus
    out["perception"] = sum(out.get(f"{c}/score", 0.0) for c in MME_PERCEPTION)
    out["cognition"] = sum(out.get(f"{c}/score", 0.0) for c in MME_COGNITION)
    # the sum over every sub-task: perception + cognition on MME's 14
    out["mme_score"] = sum(v for k, v in out.items() if k.endswith("/score"))
    return out
