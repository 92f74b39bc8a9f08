"""``vita-jax eval`` end to end on a tiny release with the real Qwen2.5 tokenizer (random weights)
and real media: the bundled CMU ARCTIC recordings (asr, spoken_qa), the fixture photo (mcq, yesno,
vqa, loss), a short generated video (video_mcq). One release, loaded once."""
import base64
import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

import vita_jax
from vita_jax import assets, cli
from vita_jax import config as config_lib
from vita_jax.evals import EvalEngine, evaluate

from conftest import FIXTURES, QWEN_TOK, write_video

PHOTO = os.path.join(FIXTURES, "vita15-tiny", "reference", "cliponly_coffee_150x90.png")
FAST = dict(batch_size=2, max_new_tokens=2)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    c = config_lib.load_config("tiny")
    c.llm.vocab_size = 152064
    c.bos_token_id, c.eos_token_id = 151643, 151645
    d = str(tmp_path_factory.mktemp("rel") / "vita-tiny-random")
    vita_jax.init_model(c, seed=3).save_pretrained(d)
    for f in os.listdir(QWEN_TOK):
        if f.endswith((".json", ".txt")) and "cases" not in f and "report" not in f:
            shutil.copy2(os.path.join(QWEN_TOK, f), d)
    return d


@pytest.fixture(scope="module")
def model(release):
    return vita_jax.from_pretrained(release)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One small file (or folder) per task, all with real media."""
    d = tmp_path_factory.mktemp("bench")
    wavs = {}
    for name, wav, text in assets.speech_clips()[:3]:
        wavs[name] = (str(d / f"{name}.wav"), text)
        sf.write(wavs[name][0], wav, 16000)
    # LibriSpeech layout: SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac + SPEAKER-CHAPTER.trans.txt
    ls = d / "LibriSpeech" / "test-other" / "61" / "70968"
    ls.mkdir(parents=True)
    lines = []
    for k, (name, (path, text)) in enumerate(sorted(wavs.items())[:2]):
        uid = f"61-70968-{k:04d}"
        sf.write(str(ls / f"{uid}.flac"), sf.read(path)[0], 16000)
        lines.append(f"{uid} {text.upper().replace(',', '').replace('.', '')}")
    (ls / "61-70968.trans.txt").write_text("\n".join(lines) + "\n")
    img64 = base64.b64encode(open(PHOTO, "rb").read()).decode()
    head = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
    (d / "mmbench.tsv").write_text(head + "0\tWhat is in the photo?\t\tcoffee\ta dog\ta car\ta tree\t"
                                   f"A\tobject\t{img64}\n"
                                   + "1\tWhat colour dominates?\tLook closely.\tbrown\tblue\tgreen\t\tA\tcolour\t0\n")
    (d / "mme.tsv").write_text("index\tcategory\timage_path\tquestion\tanswer\timage\n"
                               "0\texistence\tcoffee.png\tIs there a cup in the image? "
                               f"Please answer yes or no.\tYes\t{img64}\n"
                               "1\texistence\tcoffee.png\tIs there a dog in the image? "
                               f"Please answer yes or no.\tNo\t{img64}\n")
    shutil.copy(PHOTO, d / "coffee.png")
    (d / "vqa.jsonl").write_text(json.dumps(dict(image="coffee.png", question="What drink is this?",
                                                 answers=["coffee"] * 8 + ["tea"] * 2)) + "\n")
    write_video(d / "clip.mp4", n_frames=20, fps=4)
    (d / "videomme.json").write_text(json.dumps([dict(video="clip.mp4", question="What changes?", answer="B",
                                                      options=["A. nothing", "B. brightness", "C. colour",
                                                               "D. shape"], duration="short")]))
    (d / "spoken.jsonl").write_text(json.dumps(dict(audio=wavs["arctic_a0007"][0], image="coffee.png",
                                                    answer="superlative")) + "\n")
    conv = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    (d / "heldout.json").write_text(json.dumps([
        {"id": "img", "image": "coffee.png", "conversations": conv("<image>\nWhat is this?", "A cup of coffee.")},
        {"id": "speech", "audio": [wavs["arctic_a0009"][0]], "conversations": conv("<audio>\n", "He turned.")},
        {"id": "broken", "image": "missing.png", "conversations": conv("<image>\nWhat?", "Blue.")}]))
    return d


def _jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow  # 10-25 s on 2 cores: outside the quick loop (pytest -m "not slow")
def test_batched_equals_one_chat_per_example(model, data):
    """The batched engine (device decode loop, right-padded rows of different lengths and media)
    gives each row exactly the reply of its own chat() call."""
    eng = EvalEngine.from_model(model)
    manifest = data / "asr.jsonl"
    wavs = sorted(p for p in os.listdir(data) if p.endswith(".wav"))[:2]  # 3.5 s and 2.9 s: different lengths
    manifest.write_text("".join(json.dumps(dict(audio=w, text="x")) + "\n" for w in wavs))
    metrics, recs = evaluate(eng, dict(type="asr", data=str(manifest), batch_size=2, max_new_tokens=5))
    assert metrics["n"] == len(wavs) == 2 and metrics["examples_per_s"] > 0
    for r, w in zip(recs, wavs):
        one = eng.decode(model.tokenizer.encode(model.chat("Convert the speech to text.", audio=str(data / w),
                                                           max_new_tokens=5)))
        assert r["prediction"] == one


@pytest.mark.slow  # 10-25 s on 2 cores: outside the quick loop (pytest -m "not slow")
def test_quantized_model_evaluates_with_its_own_weights(release, data):
    """``vita-jax eval --quantize int8``: the engine decodes with the model's quantized LLM (it built a float LLM
    of the config and failed on the int8 kernels), so each row's reply is the quantized model's own chat()."""
    m = vita_jax.from_pretrained(release).quantize("int8")
    eng = EvalEngine.from_model(m)
    assert eng.llm is m.llm
    w = sorted(p for p in os.listdir(data) if p.endswith(".wav"))[0]
    manifest = data / "asr_int8.jsonl"
    manifest.write_text(json.dumps(dict(audio=w, text="x")) + "\n")
    _, recs = evaluate(eng, dict(type="asr", data=str(manifest), batch_size=1, max_new_tokens=5))
    one = m.chat("Convert the speech to text.", audio=str(data / w), max_new_tokens=5)
    assert recs[0]["prediction"] == eng.decode(m.tokenizer.encode(one))


def test_librispeech_folder_and_errors(model, data):
    eng = EvalEngine.from_model(model)
    metrics, recs = evaluate(eng, dict(type="asr", data=str(data / "LibriSpeech" / "test-other"), **FAST))
    assert [r["id"] for r in recs] == ["61-70968-0000", "61-70968-0001"]
    assert metrics["wer_units"] == sum(len(r["normalized_reference"].split()) for r in recs)
    assert metrics["wer"] == pytest.approx(100 * sum(r["edits"] for r in recs) / metrics["wer_units"])
    with pytest.raises(ValueError, match="unknown setting 'promt'"):
        evaluate(eng, dict(type="asr", data=str(data), promt="x"))
    empty = data / "empty_ls"
    empty.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match="no \\*.trans.txt"):
        evaluate(eng, dict(type="asr", data=str(empty)))


@pytest.mark.slow  # a minute or more on 2 cores: outside the quick loop
def test_cli_suite_every_task(release, data, tmp_path, capsys):
    """One `vita-jax eval --config=SUITE` over all seven tasks: files, metrics, the closing JSON lines."""
    suite = tmp_path / "eval_suite.py"
    entries = dict(asr=dict(type="asr", data=str(data / "LibriSpeech")),
                   mmbench=dict(type="mcq", data=str(data / "mmbench.tsv"), circular=True),
                   mme=dict(type="yesno", data=str(data / "mme.tsv")),
                   vqa=dict(type="vqa", data=str(data / "vqa.jsonl")),
                   videomme=dict(type="video_mcq", data=str(data / "videomme.json"), frames=4),
                   spoken=dict(type="spoken_qa", data=str(data / "spoken.jsonl")),
                   heldout=dict(type="loss", data=str(data / "heldout.json")))
    suite.write_text("import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict(dict(evals="
                     f"{entries!r}))\n")
    out = tmp_path / "out"
    assert cli.run(["eval", "--checkpoint", release, f"--config={suite}", "--out", str(out), "--batch-size", "4",
                    "--max-new-tokens", "2", "--no-progress", "--config.evals.mme.max_examples=2"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 7 and {x["task"] for x in lines} == {e["type"] for e in entries.values()}
    by = {x["task"]: x for x in lines}
    assert by["asr"]["n"] == 2 and by["asr"]["metrics"]["wer"] >= 0
    assert by["mcq"]["n"] == 7  # 4 + 3 circular copies of 2 questions
    assert by["mcq"]["metrics"]["questions"] == 2 and "category/object" in by["mcq"]["metrics"]
    m = by["yesno"]["metrics"]
    assert {"existence/acc", "existence/acc_plus", "perception", "mme_score"} <= set(m)
    assert m["existence/acc_plus"] in (0.0, 100.0) and m["mme_score"] == m["existence/score"]
    assert {"vqa_accuracy", "exact", "anls"} <= set(by["vqa"]["metrics"])
    assert by["video_mcq"]["n"] == 1 and "category/short" in by["video_mcq"]["metrics"]
    assert {"exact", "contains"} <= set(by["spoken_qa"]["metrics"])
    lm = by["loss"]["metrics"]
    assert by["loss"]["n"] == 3 and lm["tokens"] > 0 and np.isfinite(lm["loss"]) and 0 <= lm["token_accuracy"] <= 1
    for name in entries:
        recs = _jsonl(out / name / "predictions.jsonl")
        assert recs and all("id" in r for r in recs)
        assert json.load(open(out / name / "metrics.json"))["n"] == len(recs)
    heldout = {r["id"]: r for r in _jsonl(out / "heldout" / "predictions.jsonl")}
    assert heldout["broken"].get("bad") and heldout["img"]["tokens"] > 0
    mcq = _jsonl(out / "mmbench" / "predictions.jsonl")
    assert {"prediction", "reference", "hit", "choice"} <= set(mcq[0])


def test_cli_single_task_and_user_errors(release, data, tmp_path, capsys):
    out = tmp_path / "single"
    assert cli.main(["eval", "--checkpoint", release, "--task", "yesno", "--data", str(data / "mme.tsv"), "--out",
                     str(out), "--max-examples", "1", "--max-new-tokens", "1", "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["task"] == "yesno" and json.loads(last)["n"] == 1
    assert len(_jsonl(out / "predictions.jsonl")) == 1 and os.path.exists(out / "metrics.json")
    for argv, msg in ((["--task", "mcq", "--data", str(data / "nope.tsv")], "does not exist"),
                      (["--task", "nope", "--data", str(data / "mme.tsv")], "unknown eval task"),
                      (["--task", "mcq", "--data", str(data / "mme.tsv"), "--config.circularr=1"], "circularr"),
                      (["--data", str(data / "mme.tsv")], "--task and --data")):
        assert cli.main(["eval", "--checkpoint", release, "--out", str(tmp_path / "e")] + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("vita-jax: error:") and msg in err and "Traceback" not in err, err
