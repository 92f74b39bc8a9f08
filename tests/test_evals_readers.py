"""Benchmark readers (issue #24 item 5): every reader error names the file and the line or row; a transcript
without words is refused (it would change the corpus WER); media are opened when the data is read; a suite
reads all its tasks' data before the model is loaded. No model here: `/no/such/model` is never reached."""
import base64
import json
import os

import pytest
import soundfile as sf

from vita_jax import assets
from vita_jax.evals import readers, runner

from conftest import FIXTURES, cli_error

PHOTO = os.path.join(FIXTURES, "vita15-tiny", "reference", "cliponly_coffee_150x90.png")


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("wav") / "clip.wav"
    sf.write(str(path), assets.speech_clips()[0][1], 16000)
    return str(path)


def _err(settings):
    with pytest.raises(ValueError) as e:
        runner.read_data(settings)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_transcript_line_without_text_names_file_and_line(tmp_path, wav):
    ch = tmp_path / "ls" / "61" / "70968"
    ch.mkdir(parents=True)
    for uid in ("61-70968-0000", "61-70968-0001"):
        os.symlink(wav, ch / f"{uid}.wav")
    (ch / "61-70968.trans.txt").write_text("61-70968-0000 HELLO THERE\n61-70968-0001\n")
    msg = _err(dict(type="asr", data=str(tmp_path / "ls")))
    assert msg == f"{ch / '61-70968.trans.txt'} line 2: 61-70968-0001 has no transcript (a line is 'ID TRANSCRIPT')"


@pytest.mark.parametrize("row, named", [
    (dict(id="u1", text="[noise]"), "line 2: the transcript '[noise]' of u1 has no words once normalised"),
    (dict(id="u1", text="   "), "line 2: 'text' is blank"),
    (dict(id="u1", text=5), "line 2: 'text' must be a string, got int 5"),
    (dict(id="u1", text="ok", language="zh", audio_=1), None),
])
def test_asr_manifest_references_are_checked(tmp_path, wav, row, named):
    path = tmp_path / "asr.jsonl"
    good = dict(id="u0", audio=wav, text="hello there")
    path.write_text(json.dumps(good) + "\n" + json.dumps(dict(row, audio=wav)) + "\n")
    if named is None:
        assert [e["reference"] for e in runner.read_data(dict(type="asr", data=str(path)))] == ["hello there", "ok"]
    else:
        assert _err(dict(type="asr", data=str(path))) == f"{path} {named}"


def test_torn_jsonl_line_is_named_by_its_line(tmp_path, wav):
    path = tmp_path / "asr.jsonl"
    line = json.dumps(dict(audio=wav, text="hello"))
    path.write_text(f"{line}\n\n{line[:20]}\n{line}\n")  # a blank line 2, the torn line 3
    assert _err(dict(type="asr", data=str(path))).startswith(f"{path} line 3: not JSON (Unterminated string")
    path.write_text(f"[{line},\n {line}\n")  # a JSON list that is cut off
    assert _err(dict(type="asr", data=str(path))).startswith(f"{path} line 3: not JSON (Expecting")


def _tsv(path, image64):
    good = base64.b64encode(open(PHOTO, "rb").read()).decode()
    path.write_text("index\tcategory\tquestion\tanswer\timage\n"
                    f"0\texistence\tIs there a cup?\tYes\t{good}\n1\texistence\tIs there a dog?\tNo\t{image64}\n")


@pytest.mark.parametrize("image64, named", [
    (base64.b64encode(open(PHOTO, "rb").read()[:300]).decode(), "cannot read image (truncated or corrupt?)"),
    (base64.b64encode(b"not a picture at all").decode(), "not an image Pillow can read"),
])
def test_broken_base64_image_names_file_and_row(tmp_path, image64, named):
    path = tmp_path / "mme.tsv"
    _tsv(path, image64)
    msg = _err(dict(type="yesno", data=str(path)))
    assert msg.startswith(f"{path} line 3 (index 1) image: ") and named in msg


def test_tsv_rows_are_named_by_line(tmp_path):
    path = tmp_path / "mmb.tsv"
    path.write_text("index\tquestion\tA\tB\tanswer\n0\tWhich?\tx\ty\tA\nzero\tWhich?\tx\ty\tB\n")
    assert _err(dict(type="mcq", data=str(path))) == f"{path} line 3: index 'zero' is not a number"
    path.write_text("index\tquestion\tA\tB\tanswer\n0\tWhich?\tx\ty\tA\n1\tWhich?\tx\ty\n")
    assert _err(dict(type="mcq", data=str(path))) == f"{path} line 3 (index 1): no 'answer' field"


@pytest.mark.parametrize("row, named", [
    (dict(image="missing.png", question="What?", answer="x"), "missing.png: no such image file"),
    (dict(image="photo.png", question=["What?"], answer="x"), "'question' must be a string, got list"),
    (dict(image="photo.png", question="What?", answers=[{"text": "x"}]), "an object without 'answer'"),
])
def test_vqa_rows_and_media_are_named(tmp_path, row, named):
    os.symlink(PHOTO, tmp_path / "photo.png")
    path = tmp_path / "vqa.jsonl"
    path.write_text(json.dumps(dict(image="photo.png", question="What?", answer="coffee")) + "\n" + json.dumps(row))
    msg = _err(dict(type="vqa", data=str(path)))
    assert msg.startswith(f"{path} line 2: ") and named in msg


def test_suite_checks_every_task_before_loading(tmp_path, capsys, wav):
    good, bad = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    good.write_text(json.dumps(dict(audio=wav, text="hello")) + "\n")
    bad.write_text(json.dumps(dict(audio=str(tmp_path / "gone.wav"), text="hello")) + "\n")
    suite = tmp_path / "suite.py"
    evals = dict(a_first=dict(type="asr", data=str(good)), b_second=dict(type="asr", data=str(bad)))
    suite.write_text("import ml_collections\n\ndef get_config():\n"
                     f"    return ml_collections.ConfigDict(dict(evals={evals!r}))\n")
    line = cli_error(capsys, "eval", "--checkpoint", "/no/such/model", f"--config={suite}", "--out",
                     str(tmp_path / "out"))
    assert line.startswith(f"vita-jax: error: {bad} line 1: ") and "gone.wav" in line
    assert not (tmp_path / "out").exists()


def test_located_keeps_one_prefix():
    assert str(readers.located("f.tsv line 3", ValueError("f.tsv line 3 image: bad"))) == "f.tsv line 3 image: bad"
    assert str(readers.located("f.jsonl line 2", OSError("x.wav:\n gone"))) == "f.jsonl line 2: x.wav: gone"


@pytest.mark.parametrize("override, named", [
    ("--config.frames=0", "--task asr: frames = 0 must be an integer >= 1"),
    ("--config.top_p=2.0", "--task asr: top_p must be in (0, 1]"),
    ("--config.top_k=-3", "--task asr: top_k must be an integer >= 0"),
])
def test_settings_checked_before_loading(tmp_path, capsys, wav, override, named):
    path = tmp_path / "asr.jsonl"
    path.write_text(json.dumps(dict(audio=wav, text="hello")) + "\n")
    line = cli_error(capsys, "eval", "--checkpoint", "/no/such/model", "--task", "asr", "--data", str(path), "--out",
                     str(tmp_path / "o"), override)
    assert named in line


def test_undecodable_transcript_file_and_folder_for_a_file_task_are_named(tmp_path):
    ch = tmp_path / "ls" / "1" / "2"
    ch.mkdir(parents=True)
    (ch / "1-2.trans.txt").write_bytes(b"1-2-0000 HELLO \xff\n")
    assert _err(dict(type="asr", data=str(tmp_path / "ls"))).startswith(f"{ch / '1-2.trans.txt'}: not UTF-8 text")
    folder_msg = f"{tmp_path / 'ls'}: a folder; this task reads a file (see README: Evaluation)"
    assert _err(dict(type="mcq", data=str(tmp_path / "ls"))) == folder_msg
