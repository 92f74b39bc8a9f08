"""Text side of VITA-1.5: the Qwen2.5 tokenizer, the ``qwen2p5_instruct`` chat template, the
official data-loader rewrites, placeholder tokenisation and SFT label masking.

Everything here follows the official code (``vita/conversation.py``,
``vita/util/data_utils_video_audio_neg_patch.py``, ``vita/util/mm_utils.py``, ``video_audio_demo.py``)
and is checked against ``../shared/fixtures/chat-template``.
"""
from __future__ import annotations

import copy
import os
import re
import tempfile
from typing import Optional, Sequence

import numpy as np
from tokenizers import Tokenizer

from vita_jax import paths
from vita_jax.models.vita import AUDIO_TOKEN_INDEX, IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: F401  (re-exported)

IMAGE_TOKEN, AUDIO_TOKEN, VIDEO_TOKEN = "<image>", "<audio>", "<video>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
STATE_SPEECH, STATE_TEXT, STATE_NEGATIVE = "☞", "☜", "☟"
ROLES = {"human": "user", "gpt": "assistant"}

_PREAMBLE = ("You are an AI robot and your name is VITA. \n"
             "- You are a multimodal large language model developed by the open source community. "
             "Your aim is to be helpful, honest and harmless. \n"
             "- You support the ability to communicate fluently and answer user questions in multiple "
             "languages of the user's choice. \n"
             "- If the user corrects the wrong answer you generated, you will apologize and discuss the "
             "correct answer with the user.")


def _grounded(what: str, other: str) -> str:
    return (f" \n- You must answer the question strictly according to the content of the {what} given by the "
            f"user, and it is strictly forbidden to answer the question without the content of the {what}. "
            f"Please note that you are seeing the {what}, not the {other}.")


SYSTEM_PROMPTS = {"image": _PREAMBLE + _grounded("image", "video"),
                  "video": _PREAMBLE + _grounded("video", "image"),
                  "lang": _PREAMBLE}


class TextTokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer``: ``encode(text) -> list[int]`` (nothing added),
    ``decode(ids)``, ``len()`` (= 151665 for Qwen2.5, the official ``len(tokenizer)``)."""

    def __init__(self, tok, path: str = ""):
        self.tok = tok
        self.path = path
        # the tokenizer's control strings (``<|im_start|>``, ...), longest first, and the placeholders
        self.specials = sorted({t.content for t in tok.get_added_tokens_decoder().values()}, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")") if self.specials else None
        self._literal = None  # a copy that encodes control strings as plain text (made on first use)
        self.im_start_id = self.token_to_id(IM_START)
        self.im_end_id = self.token_to_id(IM_END)
        self.pad_id = self.token_to_id("<|endoftext|>")

    @classmethod
    def from_file(cls, path: str) -> "TextTokenizer":
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        try:
            return cls(Tokenizer.from_file(path), path)
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise ValueError(f"{path}: cannot load tokenizer: {e}") from e

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_escaped(self, text: str) -> list[int]:
        """Like :meth:`encode` for text holding :func:`as_text`-escaped user strings: the template's
        control tokens stay tokens, the user's typed ones become their plain-text ids."""
        if ESC not in text or self._special_re is None:
            return self.encode(text)
        if self._literal is None:
            self._literal = Tokenizer.from_str(self.tok.to_str())
            self._literal.encode_special_tokens = True
        ids: list[int] = []
        for k, seg in enumerate(self._special_re.split(text)):  # odd pieces: the template's control tokens
            if k % 2:
                ids.append(self.token_to_id(seg))
            elif seg:
                ids.extend(self._literal.encode(seg.replace(ESC, ""), add_special_tokens=False).ids)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode([int(i) for i in ids if i >= 0], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.tok.token_to_id(token)

    def __len__(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


def load_tokenizer(path: str) -> Optional[TextTokenizer]:
    """The tokenizer of a release directory (``tokenizer.json``), or None when it has none; the
    directory may be a URL (``gs://...``, read through :mod:`vita_jax.paths`)."""
    if not paths.is_local(path):
        src = path if path.endswith(".json") else paths.join(path, "tokenizer.json")
        if src != path and not paths.exists(src):
            return None
        with tempfile.TemporaryDirectory() as d:  # the tokenizers library reads a local file
            paths.copy_file(src, os.path.join(d, "tokenizer.json"))
            tok = TextTokenizer.from_file(os.path.join(d, "tokenizer.json"))
        tok.path = src  # where an export copies it from
        return tok
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "tokenizer.json")):
        return None
    return TextTokenizer.from_file(path)


# ------------------------------------------------------------------------------ user text
# A private-use character put after the first character of a control string or placeholder typed by
# a user (``<|im_start|>``, ``<image>``, ...), so that neither the template code nor the tokenizer
# takes it for the real thing; :meth:`TextTokenizer.encode_escaped` removes it and encodes the string
# as plain text. Text without such strings is unchanged, so its ids are the official ones.
ESC = "\ue000"


def as_text(text: Optional[str], tokenizer: Optional[TextTokenizer] = None) -> Optional[str]:
    """User-typed ``text`` with every control string of ``tokenizer`` and every media placeholder
    escaped (see :data:`ESC`): typed ``<|im_start|>`` is text, not a turn boundary, and typed
    ``<image>`` is text, not a tile."""
    if not text:
        return text
    text = text.replace(ESC, "")
    for sp in (tokenizer.specials if tokenizer is not None else []) + [IMAGE_TOKEN, AUDIO_TOKEN, VIDEO_TOKEN]:
        if sp in text:
            text = text.replace(sp, sp[0] + ESC + sp[1:])
    return text


# ----------------------------------------------------------------------------------- template
def system_prompt(messages: Sequence[tuple[str, Optional[str]]], modality: str) -> str:
    """The official choice: ``<image>`` in any message needs modality image/video; otherwise lang."""
    if any(m and IMAGE_TOKEN in m for _, m in messages):
        if modality not in ("image", "video"):
            raise ValueError(f"a message contains {IMAGE_TOKEN}: modality must be 'image' or 'video', got {modality!r}")
        return SYSTEM_PROMPTS[modality]
    if modality != "lang":
        raise ValueError(f"no message contains {IMAGE_TOKEN}: modality must be 'lang', got {modality!r}")
    return SYSTEM_PROMPTS["lang"]


def build_prompt(messages: Sequence[tuple[str, Optional[str]]], modality: str) -> str:
    """ChatML prompt: system turn, then each ``(role, content)``; the last turn has no trailing
    newline, an empty (None / "") content is an open turn ``<|im_start|>role\\n``."""
    ret = f"{IM_START}system\n{system_prompt(messages, modality)}{IM_END}\n"
    for i, (role, msg) in enumerate(messages):
        if msg:
            ret += f"{IM_START}{role}\n{msg}{IM_END}" + ("\n" if i < len(messages) - 1 else "")
        else:
            ret += f"{IM_START}{role}\n"
    return ret


# ------------------------------------------------------------------------------ tokenisation
def tokenize_with_placeholders(text: str, tokenizer: TextTokenizer) -> list[int]:
    """Splits at ``<image>`` / ``<audio>``, tokenises each text piece alone, one id per placeholder."""
    ids: list[int] = []
    for piece in re.split(f"({IMAGE_TOKEN}|{AUDIO_TOKEN})", text):
        if piece == IMAGE_TOKEN:
            ids.append(IMAGE_TOKEN_INDEX)
        elif piece == AUDIO_TOKEN:
            ids.append(AUDIO_TOKEN_INDEX)
        elif piece:
            ids.extend(tokenizer.encode_escaped(piece))
    return ids


# ------------------------------------------------------------------------- training samples
def preprocess_multimodal(conversations: list[dict], tiles_per_image: Sequence[int] = (), video_frames: int = 0,
                          inserted_id: Optional[int] = None) -> list[dict]:
    """The official message rewrites (placeholders moved / expanded, newlines collapsed, state
    prefix). ``conversations``: ``[{"from": "human"|"gpt", "value": str}, ...]`` (copied, not changed)."""
    source = copy.deepcopy(conversations)
    k_img = 0
    for i, sentence in enumerate(source):
        v = sentence["value"]
        if IMAGE_TOKEN in v or VIDEO_TOKEN in v:
            v = v.replace(IMAGE_TOKEN + "\n", IMAGE_TOKEN).strip()
            v = v.replace("\n" + IMAGE_TOKEN, IMAGE_TOKEN).strip()
            for tok in (IMAGE_TOKEN, VIDEO_TOKEN):
                if v.endswith(tok):
                    n = v.count(tok)
                    v = (tok * n + v.replace(tok * n, "").strip()).strip()
        if IMAGE_TOKEN in v:
            if k_img >= len(tiles_per_image):
                raise ValueError(f"message {i} has {IMAGE_TOKEN} but only {len(tiles_per_image)} "
                                 "image tile counts were given")
            v = v.replace(IMAGE_TOKEN, IMAGE_TOKEN * int(tiles_per_image[k_img]) + "\n")
            k_img += 1
        if VIDEO_TOKEN in v:
            v = v.replace(VIDEO_TOKEN, IMAGE_TOKEN * int(video_frames) + "\n")
        v = v.replace(AUDIO_TOKEN + "\n", AUDIO_TOKEN)
        v = v.replace("\n\n", "\n")
        if i == inserted_id:
            if sentence["from"] != "gpt":
                raise ValueError(f"inserted_id {inserted_id} must index a 'gpt' message")
            v = STATE_NEGATIVE + v
        elif sentence["from"] == "gpt":
            v = (STATE_SPEECH if AUDIO_TOKEN in source[i - 1]["value"] else STATE_TEXT) + v
        sentence["value"] = v
    return source


def _sft_labels(prompt: str, ids: list[int], tokenizer: TextTokenizer) -> list[int]:
    """Official masking: rounds split at ``\\n<|im_start|>user\\n`` (the first keeps the system
    turn), each split at ``\\n<|im_start|>assistant\\n``; pieces tokenised separately; all but the
    answers masked; if the summed lengths disagree with the whole prompt, everything is masked."""
    user_sep, asst_sep = f"\n{IM_START}user\n", f"\n{IM_START}assistant\n"
    labels = list(ids)
    parts = prompt.split(user_sep)
    rounds = [parts[0] + user_sep + parts[1]] + parts[2:] if len(parts) > 1 else parts
    cur = 0
    for i, rou in enumerate(rounds):
        if not rou:
            break
        halves = rou.split(asst_sep)
        if len(halves) != 2:
            break
        prefix = (user_sep if i > 0 else "") + halves[0] + asst_sep
        round_len = len(tokenize_with_placeholders((user_sep if i > 0 else "") + rou, tokenizer))
        instr_len = len(tokenize_with_placeholders(prefix, tokenizer))
        labels[cur:cur + instr_len] = [IGNORE_INDEX] * len(labels[cur:cur + instr_len])
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    if cur != len(ids):  # the official "tokenization mismatch": the whole sample is unsupervised
        labels = [IGNORE_INDEX] * len(ids)
    return labels


def encode_sample(sample: dict, tokenizer: TextTokenizer, modality: str, tiles_per_image: Sequence[int] = (),
                  video_frames: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One record of the official training JSON -> ``(input_ids, labels)`` (int64), exactly as
    the official SFT loader builds them. Tile counts per image and the number of video frames are
    given, so no media is read."""
    if "conversations" not in sample:
        raise KeyError(f"sample {sample.get('id', '?')!r}: field 'conversations' is missing")
    for k, m in enumerate(sample["conversations"]):
        if m.get("from") not in ROLES or not isinstance(m.get("value"), str):
            raise ValueError(f"sample {sample.get('id', '?')!r}: conversations[{k}] needs 'from' in "
                             f"{sorted(ROLES)} and a string 'value'")
    source = preprocess_multimodal(sample["conversations"], tiles_per_image, video_frames, sample.get("inserted_id"))
    if ROLES[source[0]["from"]] != "user":
        source = source[1:]
    messages = []
    for j, s in enumerate(source):
        role = ROLES[s["from"]]
        if role != ("user", "assistant")[j % 2]:
            raise ValueError(f"sample {sample.get('id', '?')!r}: roles must alternate human/gpt")
        messages.append((role, s["value"]))
    prompt = build_prompt(messages, modality)
    if not sample.get("end_tag", True):
        prompt = prompt[:-len(IM_END)]
    ids = tokenize_with_placeholders(prompt, tokenizer)
    labels = _sft_labels(prompt, ids, tokenizer)
    return np.asarray(ids, np.int64), np.asarray(labels, np.int64)


def generation_messages(question: str, modality: str = "lang", tiles_per_image: Sequence[int] = (),
                        video_frames: int = 0, audio: bool = False) -> list[tuple[str, Optional[str]]]:
    """The demo's user turn (``<image>`` x tiles or frames + newline + question [+ ``<audio>``]) and
    the open assistant turn."""
    content = question or ""
    if video_frames:
        content = IMAGE_TOKEN * int(video_frames) + "\n" + content
    elif tiles_per_image:
        content = IMAGE_TOKEN * int(sum(tiles_per_image)) + "\n" + content
    if audio:
        content += AUDIO_TOKEN
    return [("user", content), ("assistant", None)]


def encode_prompt(tokenizer: TextTokenizer, question: str, modality: str = "lang", tiles_per_image: Sequence[int] = (),
                  video_frames: int = 0, audio: bool = False) -> np.ndarray:
    """``input_ids`` (int64) of the official generation prompt (``video_audio_demo.py``); control
    strings and placeholders typed in ``question`` are encoded as text (:func:`as_text`)."""
    msgs = generation_messages(as_text(question, tokenizer), modality, tiles_per_image, video_frames, audio)
    return np.asarray(tokenize_with_placeholders(build_prompt(msgs, modality), tokenizer), np.int64)


def prompt_text(question: str, modality: str = "lang", tiles_per_image: Sequence[int] = (), video_frames: int = 0,
                audio: bool = False) -> str:
    return build_prompt(generation_messages(question, modality, tiles_per_image, video_frames, audio), modality)
