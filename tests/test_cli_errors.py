"""The CLI's error boundary: a user mistake is one line ``vita-jax: error: ...`` naming the file,
option or field, exit code 2, no traceback; ``--debug`` shows the traceback."""
import os

import numpy as np
import pytest
import soundfile as sf

from vita_jax import cli

from conftest import QWEN_TOK, TINY, cli_error, run_cli


def _run(*args):
    return run_cli(*args, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("args, named", [
    (("generate", "--checkpoint", "/no/such/model", "--prompt", "hi"), "/no/such/model"),
    (("convert", "--to", "orbax", "/no/such/release", "out"), "/no/such/release"),
    (("generate", TINY, "--prompt", "hi"), "tokenizer.json"),
    (("train", "--config=no_such_stage", "--workdir", "wd"), "no config named 'no_such_stage'; the names are "),
    (("train", "--config=my/no_such_stage.py:tiny", "--workdir", "wd"), "config file my/no_such_stage.py does not"),
    (("train", "--config=stage1_1:tiny", "--config.llm.hidden_sise=3", "--workdir", "wd"),
     "llm.hidden_sise"),
    (("train", "--config=tiny", "--workdir", "wd"), "stage config"),
    (("train", "--config=stage1_1:tiny", "--config.checkpoint_every=0", "--workdir", "wd"),
     "config.checkpoint_every = 0: must be at least 1"),
    (("train", "--config=stage1_1:tiny", "--config.optim.schedule=cosin", "--workdir", "wd"),
     "config.optim.schedule = 'cosin'"),
])
def test_user_mistake_is_one_line(tmp_path, args, named):
    r = _run(*[a.replace("wd", str(tmp_path / "wd")) if a == "wd" else a for a in args])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("vita-jax: error: ")
    assert named in r.stderr
    assert not os.path.exists(tmp_path / "wd")  # nothing was started


def test_debug_shows_the_traceback():
    r = _run("convert", "--to", "orbax", "/no/such/release", "out", "--debug")
    assert r.returncode == 1 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr


def test_error_right_after_opening_the_checkpoints_is_one_line(tmp_path):
    """A tokenizer that cannot load stops the run just after WORKDIR/ckpt is opened: one stderr line, no
    asyncio / orbax noise from the checkpoint manager's cleanup thread at interpreter shutdown."""
    data = tmp_path / "d.json"
    data.write_text('[{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}]')
    r = _run("train", "--config=stage1_1:tiny", '--config.data.mixture=[{"json": "%s"}]' % data,
             "--config.data.tokenizer=/no/such/tok", "--workdir", str(tmp_path / "wd"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines() == ["vita-jax: error: /no/such/tok: cannot load tokenizer: No such file or "
                                             "directory (os error 2)"], r.stderr[-3000:]


# --------------------------------------------- refused early, nothing lost (slow, as the old test_hardening.py was)




@pytest.mark.slow  # as when test_hardening.py was slow as a whole
# the checkpoint does not exist: a message naming the option proves nothing was loaded first
@pytest.mark.parametrize("opts, named", [
    (("--sample", "--top-p", "0"), "--top-p"),
    (("--top-p", "1.5"), "--top-p"),
    (("--top-p", "-0.1"), "--top-p"),
    (("--top-k", "-1"), "--top-k"),
    (("--sample", "--temperature", "0"), "--temperature"),
    (("--sample", "--temperature", "-1"), "--temperature"),
    (("--max-new-tokens", "0"), "--max-new-tokens"),
    (("--image", "a.png", "--video", "b.mp4"), "--video and --image"),
])
def test_generate_options_checked_before_loading(capsys, opts, named):
    line = cli_error(capsys, "generate", "/no/such/model", "--prompt", "hi", *opts)
    assert named in line and "/no/such/model" not in line


def _write(path, text):
    path.write_text(text)
    return str(path)


OK_SAMPLE = '[{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]'


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
@pytest.mark.parametrize("case", ["syntax", "no_get_config", "variant", "no_value", "dtype", "mixture_key",
                                  "bad_json", "big_tokenizer"])
def test_train_config_mistakes_are_one_line(tmp_path, capsys, case):
    wd = str(tmp_path / "wd")
    base = ["train", "--config=stage1_1:tiny", "--workdir", wd]
    args, named = {
        "syntax": (["train", "--config=" + _write(tmp_path / "bad.py", "def get_config(:\n"), "--workdir", wd],
                   "bad.py, line 1"),
        "no_get_config": (["train", "--config=" + _write(tmp_path / "empty.py", "x = 1\n"), "--workdir", wd],
                          "no get_config()"),
        "variant": (["train", "--config=stage1_1:tinyy", "--workdir", wd], "'tinyy'"),
        "no_value": (base + ["--config.total_steps"], "--config.total_steps"),
        "dtype": (base + ["--config.dtype=float12"], "config.dtype"),
        "mixture_key": (base + ['--config.data.mixture=[{"weight": 1}]', "--config.data.tokenizer=" + QWEN_TOK],
                        "config.data.mixture[0]"),
        "bad_json": (base + ['--config.data.mixture=[{"json": "%s"}]' % _write(tmp_path / "d.json", "[{"),
                            "--config.data.tokenizer=" + QWEN_TOK], "d.json"),
        # the tiny model's 512 ids cannot hold Qwen2.5's 151,665 (out-of-range ids trained to NaN, exit 0)
        "big_tokenizer": (base + ['--config.data.mixture=[{"json": "%s"}]' % _write(tmp_path / "ok.json", OK_SAMPLE),
                                 "--config.data.tokenizer=" + QWEN_TOK],
                          f"config.data.tokenizer = {QWEN_TOK} has 151665 tokens, "
                          "more than config.llm.vocab_size = 512"),
    }[case]
    line = cli_error(capsys, *args)
    assert named in line
    assert "processes:" not in capsys.readouterr().out  # refused before any model was built


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
@pytest.mark.parametrize("opts, named", [
    (("--ids", "1,abc"), "--ids"),
    (("--ids", "1,2", "--image", "a.png"), "--ids"),
    (("--prompt", "  "), "--prompt is empty"),
    (("--prompt", "hi", "--speak", "/no/such/dir/out.wav"), "/no/such/dir"),
])
def test_generate_mistakes_before_loading(capsys, opts, named):
    line = cli_error(capsys, "generate", "/no/such/model", *opts)
    assert named in line and "/no/such/model" not in line


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
def test_bad_dtype_and_budget_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "/no/such/model", "--prompt", "hi", "--dtype", "float12"])
    assert e.value.code == 2 and "--dtype" in capsys.readouterr().err
    assert "--budget-minutes" in cli_error(capsys, "demo", "--budget-minutes", "-1")


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
def test_multi_line_messages_become_one_line(capsys, monkeypatch):
    def boom(argv):
        raise ValueError("train.yaml: bad YAML\n  in line 3\n  column 7")
    monkeypatch.setattr(cli, "run", boom)
    line = cli_error(capsys, "generate")
    assert line == "vita-jax: error: train.yaml: bad YAML (more with --debug)"


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
def test_init_from_of_another_size_is_named(tmp_path, capsys):
    line = cli_error(capsys, "train", "--config=stage1_2:tiny", f"--config.init_from={TINY}",
                      "--config.llm.hidden_size=32", "--workdir", str(tmp_path / "wd"))
    assert "config.init_from" in line and "shape" in line


# ---------------------------------------------------------- refused early, one line naming the file, field or option


def test_empty_media_option_is_refused_before_loading(capsys):
    line = cli_error(capsys, "generate", "/no/such/model", "--prompt", "hi", "--image", "")
    assert line == "vita-jax: error: --image: an empty path"


@pytest.mark.parametrize("args, named", [
    (("generate", "/no/such/model", "--ids", " , "), "--ids: no ids given"),
    (("generate", "/no/such/model", "--prompt", "hi", "--max-new-tokens", "1000000000"), "--max-new-tokens"),
    (("generate", "/no/such/model", "--prompt", "hi", "--speech-max-tokens", "-1"), "--speech-max-tokens -1"),
    (("eval", "--checkpoint", "/no/such/model", "--task", "asr", "--data", "x", "--out", "o", "--max-examples", "-1"),
     "--max-examples -1"),
    (("eval", "--checkpoint", "/no/such/model", "--task", "asr", "--data", "x", "--out", "o", "--batch-size", "0"),
     "--batch-size 0"),
    (("eval", "--checkpoint", "/no/such/model", "--task", "asr", "--data", "x", "--out", __file__), "is a file"),
    (("compile", "--config=stage1_1:tiny", "--topology", "v5e:2x2", "--per-chip-batch", "0"),
     "--per-chip-batch 0"),
    (("compile", "--config=stage1_1:tiny", "--topology", "bogus"), "--topology bogus: expected CHIP:SHAPE"),
])
def test_options_checked_before_loading(capsys, args, named):
    """Refused before the model (or libtpu, which logs on a CPU host) is loaded: /no/such/model is never named."""
    line = cli_error(capsys, *args)
    assert named in line and "/no/such/model" not in line


def test_missing_tokenizer_is_named_before_loading(capsys):
    assert cli.main(["generate", TINY, "--prompt", "hi"]) == 2
    out, err = capsys.readouterr()
    assert err == f"vita-jax: error: {TINY} has no tokenizer.json: give the prompt as --ids\n"
    assert "loaded" not in out  # the model was not loaded first


@pytest.mark.parametrize("args, named", [
    (("serve", "--checkpoint", "/no/such/model", "--image-tiles", "0"), "--image-tiles must be at least 1, got 0"),
    (("serve", "--checkpoint", "/no/such/model", "--max-prompt", "0"), "--max-prompt must be at least 1, got 0"),
    (("train", "--config=", "--workdir", "wd"), "--config=: no config file given"),
    (("train", "--config=stage1_1:tiny", "--config.tokenizer_model_max_length=0", "--workdir", "wd"),
     "config.tokenizer_model_max_length = 0: must be at least 1"),
])
def test_serve_and_config_values_checked_first(capsys, tmp_path, args, named):
    line = cli_error(capsys, *[str(tmp_path / "wd") if a == "wd" else a for a in args])
    assert named in line and "/no/such/model" not in line
    assert not (tmp_path / "wd").exists()


# ------------------------------------------------------------------ media that cannot work: one line naming the file


@pytest.mark.parametrize("opt, name, data", [("--image", "cut.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
                                              ("--video", "speech.mp4", None), ("--audio", "empty.wav", b""),
                                              ("--audio", "bad.mp3", b"not an mp3 " * 30),
                                              ("--image", "missing.jpg", ...)])
def test_generate_refuses_bad_media_before_loading(tmp_path, capsys, opt, name, data):
    path = tmp_path / name
    if data is None:  # an audio-only file named .mp4
        sf.write(tmp_path / "s.wav", np.zeros(1600, np.float32), 16000)
        os.rename(tmp_path / "s.wav", path)
    elif data is not ...:
        path.write_bytes(data)
    rc = cli.main(["generate", "/no/such/model", "--prompt", "hi", opt, str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vita-jax: error: {opt}: ") and str(path) in lines[0], err
    assert "/no/such/model" not in lines[0]  # refused before the model was looked at
