"""The evaluators' scorers against known answers: WER against jiwer after Whisper's normaliser,
CER, VQAv2 accuracy, ANLS, VLMEvalKit's option matching, MMBench circular, MME acc / acc+."""
import jiwer
import pytest

from vita_jax.evals import choices, tasks
from vita_jax.evals import text_metrics as tm

REFS = ["Mr. Smith bought 2 apples for $3.50, didn't he?",
        "I'm going to the U.S. on the 21st of March.",
        "Twenty-five people can't be wrong!",
        "He turned sharply, and faced Gregson across the table.",
        "The colour of the sky is grey."]
HYPS = ["mister smith bought two apples for three dollars fifty did not he",
        "I am gonna go to the US on March 21.",
        "25 people cannot be wrong",
        "he turned sharply and faced gregson across table",
        "the color of the sky is gray"]


def test_whisper_normaliser_examples():
    n = tm.normalize_english
    assert n("Mr. Smith") == "mister smith"
    assert n("I'm gonna buy twenty-five apples.") == "i am going to buy 25 apples"
    assert n("The colour grey") == "the color gray"
    assert n("$3.50") == "$3.50"


def test_corpus_wer_equals_jiwer():
    refs = [tm.normalize_english(r) for r in REFS]
    hyps = [tm.normalize_english(h) for h in HYPS]
    pairs = [tm.word_edits(r, h) for r, h in zip(refs, hyps)]
    ours = tm.corpus_rate(pairs)
    assert ours == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
    assert 0 < ours < 1
    # the task: corpus WER in percent = total edits / total words, not a mean of rates
    task = tasks.get("asr")
    recs = [task.score(dict(reference=r, language="en"), h, {}) for r, h in zip(REFS, HYPS)]
    assert task.aggregate(recs, {})["wer"] == pytest.approx(100 * ours)
    assert sum(r["edits"] for r in recs) == sum(e for e, _ in pairs)
    mean_of_rates = sum(r["wer"] for r in recs) / len(recs)
    assert abs(mean_of_rates - ours) > 1e-3  # the two differ here: the corpus rate is what is reported


def test_word_edits_known():
    assert tm.word_edits("the cat sat on the mat", "the cat sat on a mat") == (1, 6)
    assert tm.word_edits("a b c", "") == (3, 3)
    assert tm.word_edits("a b", "a b c d") == (2, 2)


def test_cer_chinese():
    assert tm.char_edits("今天天气很好。", "今天天汽很好") == (1, 6)
    task = tasks.get("asr")
    r = task.score(dict(reference="今天天气很好。", language="zh"), "今天 天汽很好！", {})
    assert task.aggregate([r], {})["cer"] == pytest.approx(100 / 6)


def test_vqa_accuracy():
    assert tm.normalize_vqa("The Two dogs!") == "2 dogs"
    assert tm.normalize_vqa("dont") == "don't"
    ten = ["yes"] * 2 + ["no"] * 8
    assert tm.vqa_accuracy("Yes", ten) == pytest.approx(0.6)  # 2 humans agree -> 0.6
    assert tm.vqa_accuracy("yes.", ["yes"] * 3 + ["no"] * 7) == pytest.approx(0.9)  # 3 -> 0.9
    assert tm.vqa_accuracy("two", ["2"] * 10) == 1.0
    assert tm.vqa_accuracy("cat", ["dog"] * 10) == 0.0
    assert tm.exact_match("A dog.", ["dog"]) == 1.0 and tm.exact_match("dogs", ["dog"]) == 0.0
    assert tm.contains_match("It is a red car.", ["red car"]) == 1.0
    assert tm.contains_match("It is a redcar.", ["red car"]) == 0.0


def test_anls():
    assert tm.anls("hello worl", ["hello world"]) == pytest.approx(1 - 1 / 11)
    assert tm.anls("Hello  World", ["x", "hello world"]) == 1.0
    assert tm.anls("abc", ["xyz"]) == 0.0


def test_option_extraction():
    opts = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
    assert choices.infer_option("B", opts) == "B"
    assert choices.infer_option("The answer is (C).", opts) == "C"
    assert choices.infer_option("A", opts) == "A"
    assert choices.infer_option("A cat sits on the mat", opts) == "A"  # 'A' is an article; the text names cat
    assert choices.infer_option("A or B", opts) is None
    assert choices.infer_option("I think it is a dog", opts) == "B"
    assert choices.infer_option("a dog or a cat", opts) is None
    assert choices.infer_option("Z", opts) == "Z"
    assert choices.infer_option("Cannot determine the answer", opts) == "Z"


def test_circular():
    rots = choices.rotations({"A": "cat", "B": "dog", "C": "bird"}, "B")
    assert rots == [({"A": "cat", "B": "dog", "C": "bird"}, "B"), ({"A": "dog", "B": "bird", "C": "cat"}, "A"),
                    ({"A": "bird", "B": "cat", "C": "dog"}, "C")]
    recs = [dict(group="1", hit=1), dict(group="1", hit=1), dict(group="1", hit=1),
            dict(group="2", hit=1), dict(group="2", hit=0)]
    assert choices.circular_groups(recs) == (0.5, 2)
    task = tasks.get("mcq")
    out = task.aggregate([dict(r, id=f"{r['group']}@{k}", extracted=1.0, category="x") for k, r in enumerate(recs)],
                         dict(circular=True))
    assert out["circular_accuracy"] == 0.5 and out["accuracy"] == pytest.approx(0.8)
    assert out["category/x"] == 0.5


def test_yes_no_and_mme():
    assert choices.yes_no("Yes, it is.") == "Yes"
    assert choices.yes_no("No.") == "No"
    assert choices.yes_no("yes or no") == "Unknown"
    assert choices.yes_no("I don't know") == "Unknown"
    recs = [dict(category="existence", image="i1", hit=1), dict(category="existence", image="i1", hit=1),
            dict(category="existence", image="i2", hit=1), dict(category="existence", image="i2", hit=0),
            dict(category="OCR", image="o1", hit=0), dict(category="OCR", image="o1", hit=0),
            dict(category="code_reasoning", image="c1", hit=1), dict(category="code_reasoning", image="c1", hit=0)]
    s = choices.mme_scores(recs)
    assert s["existence/acc"] == 75.0 and s["existence/acc_plus"] == 50.0 and s["existence/score"] == 125.0
    assert s["OCR/score"] == 0.0
    assert s["code_reasoning/acc"] == 50.0 and s["code_reasoning/acc_plus"] == 0.0
    assert s["perception"] == 125.0 and s["cognition"] == 50.0 and s["mme_score"] == 175.0
