"""Scores of free-form answers: WER / CER, VQAv2 accuracy, exact match, contains, ANLS.

* WER: Whisper's English text normaliser (the ``whisper-normalizer`` package: spelling,
  contractions, numbers written as digits, punctuation removed), then word edits by ``jiwer``; the
  corpus WER is total edits / total reference words (never a mean of per-utterance rates).
* CER (Chinese and other unsegmented scripts): Whisper's basic normaliser, spaces removed, then
  character edits / reference characters.
* VQAv2 accuracy: the official answer normalisation (punctuation, digits for number words,
  articles dropped, contractions restored); an answer scores ``min(#matching humans / 3, 1)``
  averaged over the 10 leave-one-out subsets of the 10 human answers.
* ANLS (DocVQA): ``1 - normalised Levenshtein distance`` to the closest reference, 0 when that
  distance is >= 0.5; strings lower-cased and stripped.
"""
from __future__ import annotations

import functools
import re
from typing import Sequence

import jiwer
from rapidfuzz.distance import Levenshtein
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer


@functools.lru_cache(maxsize=1)
def _english():
    return EnglishTextNormalizer()


@functools.lru_cache(maxsize=1)
def _basic():
    return BasicTextNormalizer()


def normalize_english(text: str) -> str:
    """Whisper's English normaliser (what the Whisper and most ASR papers' WER use)."""
    return _english()(text or "")


def word_edits(ref: str, hyp: str) -> tuple[int, int]:
    """``(edits, reference words)`` between two normalised strings (edits = S + D + I)."""
    r, h = ref.split(), hyp.split()
    if not r:
        return len(h), 0
    if not h:
        return len(r), len(r)
    o = jiwer.process_words(" ".join(r), " ".join(h))
    return o.substitutions + o.deletions + o.insertions, len(r)


def char_edits(ref: str, hyp: str) -> tuple[int, int]:
    """``(edits, reference characters)`` after Whisper's basic normaliser with spaces removed."""
    r, h = ("".join(_basic()(s or "").split()) for s in (ref, hyp))
    return Levenshtein.distance(r, h), len(r)


def corpus_rate(pairs: Sequence[tuple[int, int]]) -> float:
    """Total edits / total reference units of ``(edits, units)`` pairs (``nan`` for no units)."""
    units = sum(n for _, n in pairs)
    return sum(e for e, _ in pairs) / units if units else float("nan")


# ------------------------------------------------------------------------------ VQAv2
_CONTRACTIONS = {  # the official evaluation's table, its keys without the apostrophe
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've"}
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"  # as the official table has it
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def punctuation(text: str) -> str:
    """The VQAv2 evaluation's punctuation handling (VLMEvalKit's yes/no extraction uses it too)."""
    out = text
    for p in _PUNCT:
        # glued to a word ("it's-a") the mark becomes nothing, between words a space
        if (p + " " in text or " " + p in text) or _COMMA_DIGITS.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def normalize_vqa(text: str) -> str:
    """The VQAv2 evaluation's answer normalisation."""
    text = (text or "").replace("\n", " ").replace("\t", " ").strip()
    words = []
    for w in punctuation(text).lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against the human ``answers`` (usually 10): the mean over
    each answer left out of ``min(#other answers equal to the prediction / 3, 1)``."""
    if not answers:
        return float("nan")
    pred = normalize_vqa(prediction)
    gts = [normalize_vqa(a) for a in answers]
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(g == pred for g in others) / 3.0))
    return sum(accs) / len(accs)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised reference."""
    pred = normalize_vqa(prediction)
    return float(any(pred == normalize_vqa(a) for a in answers))


def contains_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when a normalised reference appears, as whole words, in the normalised prediction."""
    pred = f" {normalize_vqa(prediction)} "
    return float(any(f" {normalize_vqa(a)} " in pred for a in answers if normalize_vqa(a)))


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one prediction (the max over references)."""
    pred = " ".join((prediction or "").lower().split())
    best = 0.0
    for a in answers:
        ref = " ".join(str(a).lower().split())
        d = Levenshtein.normalized_distance(pred, ref)
        best = max(best, 1.0 - d if d < threshold else 0.0)
    return best
