"""Unit vocabularies for CTC, trained with sentencepiece from transcripts, and the CER metric."""
from __future__ import annotations

import io
import re
from typing import Iterable, Sequence

import sentencepiece as spm


def normalize(text: str) -> str:
    """Lower case, letters / digits / apostrophes, single spaces (what CTC targets are made of)."""
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9' ]", " ", text.lower())).strip()


class UnitVocab:
    """A sentencepiece model; CTC ids are sentencepiece ids + 1 (0 is the CTC blank)."""

    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def train(cls, transcripts: Iterable[str], vocab_size: int = 0, model_type: str = "char") -> "UnitVocab":
        """``model_type`` char / unigram / bpe; ``vocab_size`` 0 = as many as the text needs (char)."""
        texts = [normalize(t) for t in transcripts]
        if not any(texts):
            raise ValueError("no transcript text to train a unit vocabulary on")
        if vocab_size <= 0:
            vocab_size = len(set("".join(texts).replace(" ", ""))) + 2  # characters + '▁' + <unk>
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
                                       model_type=model_type, character_coverage=1.0, bos_id=-1, eos_id=-1,
                                       pad_id=-1, unk_id=0, hard_vocab_limit=False, minloglevel=2)
        return cls(buf.getvalue())

    @property
    def num_units(self) -> int:
        """Classes of the CTC head, blank included."""
        return self.sp.get_piece_size() + 1

    def encode(self, text: str) -> list[int]:
        return [i + 1 for i in self.sp.encode(normalize(text))]

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) - 1 for i in ids if i > 0])

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.proto)

    @classmethod
    def load(cls, path: str) -> "UnitVocab":
        with open(path, "rb") as f:
            return cls(f.read())


def edit_distance(a: Sequence, b: Sequence) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Character error rate over a set: total edits / total reference characters (normalised text)."""
    refs, hyps = [normalize(r) for r in refs], [normalize(h) for h in hyps]
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps)) / max(1, sum(len(r) for r in refs))
