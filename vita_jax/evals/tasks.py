"""The evaluation tasks, chosen by name (``TASKS``). A task reads its data into examples (``id``,
``question``: the user turn's text, optional ``image`` / ``audio`` / ``video``, ``reference``),
scores one reply (:meth:`Task.score` -> per-example numbers) and sums the records of all examples
into metrics (:meth:`Task.aggregate`). ``loss`` is scored by the engine (teacher forcing), not
from replies.

Settings (one dict per evaluator, every key optional but ``data``): ``prompt`` (asr: the
instruction, spoken_qa: text beside the audio), ``prompt_suffix`` (vqa), ``language`` (asr: ``en``
-> WER, ``zh`` -> CER), ``circular`` (mcq), ``frames`` (video_mcq, 16).
"""
from __future__ import annotations

import collections
import hashlib
import os
from typing import Optional

import numpy as np

from vita_jax.evals import choices, readers
from vita_jax.evals import text_metrics as tm

# the official ASR prompt was never published: this instruction is vita_jax's choice
ASR_PROMPT = "Convert the speech to text."
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
MCQ_SUFFIX = "Please select the correct answer from the options above. \n"
VIDEO_SUFFIX = "Please respond with only the letter of the correct answer."


def _mean(records, key) -> float:
    vals = [r[key] for r in records if r.get(key) is not None and not np.isnan(r[key])]
    return float(np.mean(vals)) if vals else float("nan")


def _per_category(records, key="hit") -> dict:
    cats = collections.defaultdict(list)
    for r in records:
        if r.get("category"):
            cats[r["category"]].append(float(r[key]))
    return {f"category/{c}": float(np.mean(v)) for c, v in sorted(cats.items())}


def _manifest(settings, fields):
    """``(index, row, where, folder)`` of each entry of the JSON / JSONL ``settings["data"]``, each
    checked to have ``fields``."""
    path = settings["data"]
    root = os.path.dirname(path)
    for i, (where, r) in enumerate(readers.read_manifest(path)):
        readers.require(r, fields, where)
        yield i, r, where, root


class Task:
    name = ""
    generative = True

    def read(self, settings) -> list[dict]:
        raise NotImplementedError

    def score(self, ex: dict, prediction: str, settings) -> dict:
        raise NotImplementedError

    def aggregate(self, records: list[dict], settings) -> dict:
        raise NotImplementedError


class ASR(Task):
    """Corpus WER (English, Whisper normaliser) or CER (``language="zh"``)."""
    name = "asr"

    def read(self, settings):
        path = settings["data"]
        if os.path.isdir(path):
            rows = readers.librispeech(path)
        else:
            rows = [dict(r, id=str(r.get("id", i)), audio=readers.media_path(root, r["audio"]), where=where)
                    for i, r, where, root in _manifest(settings, ("audio", "text"))]
        prompt = settings.get("prompt") or ASR_PROMPT
        out = [dict(id=r["id"], question=prompt, audio=r["audio"], reference=r["text"], where=r["where"],
                    language=str(r.get("language", settings.get("language", "en")))) for r in rows]
        for ex in out:  # an empty reference adds its insertions to the corpus rate against no units
            if not self.score(ex, "", settings)["units"]:
                raise ValueError(f"{ex['where']}: the transcript {ex['reference']!r} of {ex['id']} has no "
                                 f"{'characters' if ex['language'].startswith('zh') else 'words'} once normalised")
        return out

    def score(self, ex, prediction, settings):
        if str(ex["language"]).startswith("zh"):
            edits, n = tm.char_edits(ex["reference"], prediction)
            return dict(edits=edits, units=n, unit="char", cer=edits / n if n else float("nan"))
        ref, hyp = tm.normalize_english(ex["reference"]), tm.normalize_english(prediction)
        edits, n = tm.word_edits(ref, hyp)
        return dict(edits=edits, units=n, unit="word", wer=edits / n if n else float("nan"),
                    normalized_reference=ref, normalized_prediction=hyp)

    def aggregate(self, records, settings):
        out = {}
        for unit, key in (("word", "wer"), ("char", "cer")):
            rs = [(r["edits"], r["units"]) for r in records if r["unit"] == unit]
            if rs:
                out[key] = 100.0 * tm.corpus_rate(rs)
                out[f"{key}_units"] = sum(n for _, n in rs)
        return out


def _options(row: dict) -> dict:
    return {c: row[c] for c in choices.LETTERS if row.get(c) not in (None, "", "nan")}


def mcq_question(question: str, options: dict, hint: Optional[str] = None) -> str:
    """VLMEvalKit's multiple-choice prompt: ``Hint: ...`` (when given), ``Question: ...``, the
    options one a line, and the instruction."""
    text = f"Hint: {hint}\n" if hint else ""
    text += f"Question: {question}\n"
    if options:
        text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items()) + MCQ_SUFFIX
    return text


class MCQ(Task):
    """Accuracy (overall, per category) by exact option matching; ``circular``: MMBench's circular
    evaluation (a question counts when all rotations of its options are right)."""
    name = "mcq"

    def read(self, settings):
        path = settings["data"]
        out = []
        rows = readers.read_tsv(path)
        circular = bool(settings.get("circular", False))
        has_copies = any(int(float(r["index"])) >= 1_000_000 for r in rows)
        for r in rows:
            where = r["where"]
            readers.require(r, ("question", "answer"), where)
            opts = _options(r)
            if r["answer"] not in opts:
                raise ValueError(f"{where}: answer {r['answer']!r} is not one of the options {list(opts)}")
            base = dict(image=readers.image_bytes(r["image"], where) if r.get("image") else None,
                        category=r.get("category") or "", group=str(int(float(r["index"])) % 1_000_000))
            hint = r.get("hint") if r.get("hint") not in (None, "", "nan") else None
            copies = choices.rotations(opts, r["answer"]) if circular and not has_copies else [(opts, r["answer"])]
            for k, (o, ans) in enumerate(copies):
                out.append(dict(base, id=r["index"] if k == 0 else f"{r['index']}@{k}", options=o, reference=ans,
                                question=mcq_question(r["question"], o, hint), where=where))
        return out

    def score(self, ex, prediction, settings):
        letter = choices.infer_option(prediction, ex["options"])
        return dict(choice=letter, hit=float(letter == ex["reference"]), extracted=float(letter is not None))

    def aggregate(self, records, settings):
        out = dict(accuracy=_mean(records, "hit"), extracted=_mean(records, "extracted"))
        if settings.get("circular", False) or len({r.get("group", r["id"]) for r in records}) < len(records):
            out["circular_accuracy"], out["questions"] = choices.circular_groups(records)
            groups = collections.defaultdict(list)
            for r in records:
                groups[(r["group"], r.get("category", ""))].append(r["hit"])
            out.update(_per_category([dict(category=c, hit=float(all(v))) for (_, c), v in groups.items()]))
        else:
            out.update(_per_category(records))
        return out


class YesNo(Task):
    """MME: accuracy and accuracy+ per sub-task, perception, cognition and the MME score."""
    name = "yesno"

    def read(self, settings):
        path = settings["data"]
        out = []
        for r in readers.read_tsv(path):
            where = r["where"]
            readers.require(r, ("question", "answer", "image"), where)
            ans = r["answer"].strip().capitalize()
            if ans not in ("Yes", "No"):
                raise ValueError(f"{where}: answer {r['answer']!r} is not Yes or No")
            key = r.get("image_path") or hashlib.sha1(r["image"].encode()).hexdigest()
            out.append(dict(id=r["index"], question=r["question"], image=readers.image_bytes(r["image"], where),
                            reference=ans, category=r.get("category") or "all", image_key=key, where=where))
        return out

    def score(self, ex, prediction, settings):
        yn = choices.yes_no(prediction)
        return dict(choice=yn, hit=float(yn == ex["reference"]))

    def aggregate(self, records, settings):
        out = dict(accuracy=_mean(records, "hit"))
        out.update(choices.mme_scores([dict(category=r["category"], image=r["image_key"], hit=r["hit"])
                                       for r in records]))
        return out


def _answers(r: dict, where: str) -> list:
    if r.get("answers") is not None and (not isinstance(r["answers"], list) or not r["answers"]):
        raise ValueError(f"{where}: 'answers' must be a non-empty list, got {r['answers']!r}")
    if r.get("answers"):
        if any(isinstance(a, dict) and a.get("answer") is None for a in r["answers"]):
            raise ValueError(f"{where}: an entry of 'answers' is an object without 'answer'")
        return [str(a["answer"]) if isinstance(a, dict) else str(a) for a in r["answers"]]
    if r.get("answer") not in (None, ""):
        return [str(r["answer"])]
    raise ValueError(f"{where}: no 'answers' list or 'answer' field")


class VQA(Task):
    """Open answers: VQAv2 accuracy, exact match and ANLS (each a mean over examples)."""
    name = "vqa"

    def read(self, settings):
        suffix = settings.get("prompt_suffix", VQA_SUFFIX)
        out = []
        for i, r, where, root in _manifest(settings, ("question",)):
            out.append(dict(id=str(r.get("id", r.get("question_id", i))), question=r["question"] + suffix,
                            image=readers.media_path(root, r.get("image")), reference=_answers(r, where),
                            where=where))
        return out

    def score(self, ex, prediction, settings):
        refs = ex["reference"]
        return dict(vqa_accuracy=tm.vqa_accuracy(prediction, refs), exact=tm.exact_match(prediction, refs),
                    anls=tm.anls(prediction, refs))

    def aggregate(self, records, settings):
        return {k: _mean(records, k) for k in ("vqa_accuracy", "exact", "anls")}


def _video_options(opts, where: str) -> dict:
    if isinstance(opts, dict):
        return {str(k): str(v) for k, v in opts.items()}
    if not isinstance(opts, list) or not opts:
        raise ValueError(f"{where}: 'options' must be a list or a letter -> text object")
    out = {}
    for k, o in enumerate(opts):
        o = str(o)
        # Video-MME writes "A. text"; plain texts get letters in order
        if len(o) > 2 and o[0] in choices.LETTERS and o[1] in ".)" and o[2] == " ":
            out[o[0]] = o[3:]
        else:
            out[choices.LETTERS[k]] = o
    return out


class VideoMCQ(Task):
    """Video-MME style: 16 frames, the options, "Please respond with only the letter of the correct
    answer."; accuracy overall and per category (e.g. the duration)."""
    name = "video_mcq"

    def read(self, settings):
        out = []
        for i, r, where, root in _manifest(settings, ("video", "question", "options", "answer")):
            opts = _video_options(r["options"], where)
            ans = str(r["answer"]).strip()
            if ans not in opts:
                raise ValueError(f"{where}: answer {ans!r} is not one of the options {list(opts)}")
            q = r["question"] + "\n" + "\n".join(f"{k}. {v}" for k, v in opts.items()) + "\n" + VIDEO_SUFFIX
            out.append(dict(id=str(r.get("id", r.get("question_id", i))), question=q, options=opts, reference=ans,
                            video=readers.media_path(root, r["video"]),
                            category=str(r.get("category", r.get("duration", "")) or ""), where=where))
        return out

    score = MCQ.score
    aggregate = MCQ.aggregate


class SpokenQA(Task):
    """A spoken question (optionally with an image) -> answer: exact and contains match."""
    name = "spoken_qa"

    def read(self, settings):
        out = []
        for i, r, where, root in _manifest(settings, ("audio",)):
            out.append(dict(id=str(r.get("id", i)), question=r.get("question") or settings.get("prompt") or "",
                            audio=readers.media_path(root, r["audio"]), image=readers.media_path(root, r.get("image")),
                            reference=_answers(r, where), where=where))
        return out

    def score(self, ex, prediction, settings):
        refs = ex["reference"]
        return dict(exact=tm.exact_match(prediction, refs), contains=tm.contains_match(prediction, refs))

    def aggregate(self, records, settings):
        return {k: _mean(records, k) for k in ("exact", "contains")}


class Loss(Task):
    """Held-out loss (mean over target tokens), perplexity, token accuracy and reply exact match
    (the fraction of examples whose every target token is the argmax) on official-format JSON;
    examples come from :mod:`vita_jax.data.sources` and are scored by teacher forcing."""
    name = "loss"
    generative = False

    def read(self, settings):
        return []  # the engine reads the official JSON itself (its own preprocessing)

    def aggregate(self, records, settings):
        tokens = sum(r["tokens"] for r in records)
        nll = sum(r["nll"] for r in records)
        scored = [r for r in records if r["tokens"]]
        return dict(loss=nll / tokens if tokens else float("nan"),
                    # every target token the argmax given the true prefix = greedy decoding reproduces the reply
                    reply_exact=(float(np.mean([r["correct"] == r["tokens"] for r in scored])) if scored
                                 else float("nan")),
                    perplexity=float(np.exp(nll / tokens)) if tokens else float("nan"),
                    token_accuracy=sum(r["correct"] for r in records) / tokens if tokens else float("nan"),
                    tokens=tokens)


TASKS = {t.name: t() for t in (ASR, MCQ, YesNo, VQA, VideoMCQ, SpokenQA, Loss)}


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown eval task {name!r}: one of {', '.join(TASKS)}")
    return TASKS[name]
