"""Tokenizer (420 reference encodings) and the official chat template / SFT labels (18 cases)."""
import json
import os

import pytest

from vita_jax.data import text as T

from conftest import FIXTURES, QWEN_TOK

CASES = [json.loads(line) for line in open(os.path.join(FIXTURES, "chat-template/cases.jsonl"))]


@pytest.fixture(scope="module")
def tok():
    return T.TextTokenizer.from_file(QWEN_TOK)


def test_tokenizer_encode_cases(tok):
    cases = [json.loads(line) for line in open(os.path.join(QWEN_TOK, "encode_cases.jsonl"))]
    assert len(cases) == 420
    wrong = [c["text"] for c in cases if tok.encode(c["text"]) != c["ids"]]
    assert not wrong, wrong[:5]
    assert len(tok) == 151665 and tok.im_start_id == 151644 and tok.im_end_id == 151645 and tok.pad_id == 151643
    assert tok.encode("☞Hello") == [144766, 9707]


@pytest.mark.parametrize("case", [c for c in CASES if c["form"] == "sft"], ids=lambda c: c["id"])
def test_sft_case(tok, case):
    ids, labels = T.encode_sample(case["sample"], tok, case["modality"], case.get("tiles_per_image") or (),
                                  case.get("video_frames") or 0)
    msgs = T.preprocess_multimodal(case["sample"]["conversations"], case.get("tiles_per_image") or (),
                                   case.get("video_frames") or 0, case["sample"].get("inserted_id"))
    assert [m["value"] for m in msgs] == [m["value"] for m in case["processed_conversations"]]
    assert T.build_prompt([tuple(m) for m in case["template_messages"]], case["modality"]) == case["prompt"]
    assert ids.tolist() == case["input_ids"]
    assert labels.tolist() == case["labels"]


@pytest.mark.parametrize("case", [c for c in CASES if c["form"] == "generation"], ids=lambda c: c["id"])
def test_generation_case(tok, case):
    g = case["generation_inputs"]
    args = (g.get("question", ""), case["modality"], case.get("tiles_per_image") or (), case.get("video_frames") or 0,
            "audio" in g)
    assert T.prompt_text(*args) == case["prompt"]
    assert T.encode_prompt(tok, *args).tolist() == case["input_ids"]


def test_template_modality_rules():
    with pytest.raises(ValueError, match="modality must be 'image' or 'video'"):
        T.build_prompt([("user", "<image>\nhi"), ("assistant", None)], "lang")
    with pytest.raises(ValueError, match="modality must be 'lang'"):
        T.build_prompt([("user", "hi"), ("assistant", None)], "image")


def test_tokenization_mismatch_masks_everything(tok, monkeypatch):
    """If the per-round lengths disagree with the whole prompt, the official loader drops all labels."""
    sample = CASES[0]["sample"]
    real = T.tokenize_with_placeholders
    calls = {"n": 0}

    def skewed(text, tokenizer):
        calls["n"] += 1
        out = real(text, tokenizer)
        return out + [0] if calls["n"] == 2 else out  # the first round measured one token too long
    monkeypatch.setattr(T, "tokenize_with_placeholders", skewed)
    ids, labels = T.encode_sample(sample, tok, "lang")
    assert (labels == T.IGNORE_INDEX).all()


def test_bad_sample_named(tok):
    with pytest.raises(KeyError, match="conversations"):
        T.encode_sample({"id": "x1"}, tok, "lang")
    with pytest.raises(ValueError, match="x2"):
        T.encode_sample({"id": "x2", "conversations": [{"from": "robot", "value": "hi"}]}, tok, "lang")
    with pytest.raises(ValueError, match="tile counts"):
        T.encode_sample({"id": "x3", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                       {"from": "gpt", "value": "ok"}]}, tok, "image")
