"""Hardening: options and inputs that cannot work stop early with one line naming the option, file or
key (exit code 2 through the CLI, no traceback), and nothing is lost."""
import numpy as np
import pytest

from vita_jax import cli
from vita_jax.infer import generate as gen

from conftest import FIXTURES, HANG_S, TINY
from conftest import cli_error as _cli_error

pytestmark = pytest.mark.slow  # minutes: outside the quick loop (pytest -m "not slow")

QWEN = FIXTURES + "/qwen2.5-tokenizer"




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
    line = _cli_error(capsys, "generate", "/no/such/model", "--prompt", "hi", *opts)
    assert named in line and "/no/such/model" not in line


def test_greedy_ignores_temperature_zero():
    gen.check_sampling(8, do_sample=False, temperature=0.0, top_k=0, top_p=1.0)  # greedy: temperature unused
    gen.check_sampling(1, do_sample=True, temperature=0.7, top_k=0, top_p=1.0)   # top_k 0 = off


@pytest.mark.parametrize("field, kw", [("top_p", dict(top_p=0.0)), ("top_k", dict(top_k=-2)),
                                       ("temperature", dict(temperature=0.0)),
                                       ("max_new_tokens", dict(max_new_tokens=0))])
def test_library_names_the_field(tiny_model, field, kw):
    sampling = dict(max_new_tokens=2, do_sample=True, temperature=1.0, top_k=0, top_p=1.0) | kw
    with pytest.raises(ValueError, match=field):
        tiny_model.generate(np.asarray([[1, 2, 3]]), **sampling)
    with pytest.raises(ValueError, match=field):
        tiny_model.chat("hi", **sampling)


def test_top_p_tiny_keeps_the_top_token():
    """Even a top_p below every probability keeps the most likely token (never all masked -> id 0)."""
    import jax
    logits = np.asarray([[0.0, 1.0, 5.0, 2.0], [3.0, 0.0, 0.0, 9.0]], np.float32)
    for seed in range(5):
        ids = gen.sample_logits(logits, jax.random.PRNGKey(seed), True, 1.0, 0, 1e-9)
        assert list(np.asarray(ids)) == [2, 3]


def test_chat_refuses_image_and_video(tiny_model):
    with pytest.raises(ValueError, match="image and video"):
        tiny_model.chat_inputs("hi", image="a.png", video="b.mp4")


def _tree(root):
    import os
    return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
                  for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("target", ["SRC", "SRC/inside", "PARENT", "LINK", "LINK/inside"])
def test_convert_overwrite_never_touches_the_source(tmp_path, capsys, target):
    import os
    import shutil
    src = tmp_path / "release"
    shutil.copytree(TINY, src)
    os.symlink(src, tmp_path / "link")
    before, around = _tree(src), sorted(os.listdir(tmp_path))
    dst = {"SRC": str(src), "SRC/inside": str(src / "vita_tts_ckpt"), "PARENT": str(tmp_path),
           "LINK": str(tmp_path / "link"), "LINK/inside": str(tmp_path / "link" / "sub")}[target]
    for fmt in ("orbax", "pytorch"):
        line = _cli_error(capsys, "convert", "--to", fmt, "--overwrite", str(src), dst)
        assert dst in line and str(src) in line
    assert _tree(src) == before and sorted(os.listdir(tmp_path)) == around  # nothing written, nothing deleted


def test_save_pretrained_refuses_its_source(tmp_path):
    import os
    import shutil

    import vita_jax
    src = tmp_path / "release"
    shutil.copytree(TINY, src)
    before = _tree(src)
    m = vita_jax.from_pretrained(str(src))
    for dst in (src, tmp_path, src / "sub"):
        with pytest.raises(ValueError, match="source"):
            m.save_pretrained(str(dst), format="orbax", overwrite=True)
    assert _tree(src) == before and sorted(os.listdir(tmp_path)) == ["release"]


# ------------------------------------------------------------------------------- training data
def _official_setup(root, samples_fn):
    """A tokenizer over DemoData's text QA and one official file: ``samples_fn(good samples)``."""
    import json

    import vita_jax.demo.data as demo_data
    from vita_jax.data.text import TextTokenizer
    d = demo_data.DemoData(str(root), demo_data.Speech("recordings"), n_train=4)
    good = json.load(open(d.text_qa("train", 4)))
    texts = [m["value"] for s in good for m in s["conversations"]]
    demo_data.build_tokenizer(texts + demo_data.reply_texts(), str(root / "tok"))
    vocab = -(-len(TextTokenizer.from_file(str(root / "tok"))) // 64) * 64
    path = root / "mix.json"
    path.write_text(json.dumps(samples_fn(good)))
    return str(path), str(root / "tok"), vocab


def _stage(path, tok, vocab, steps):
    from vita_jax import config as config_lib
    c = config_lib.load_config("stage2_2:tiny")
    c.total_steps, c.checkpoint_every = steps, 100
    c.llm.vocab_size, c.data.tokenizer, c.data.packing, c.data.seq_len = vocab, tok, False, 256
    c.data.mixture = [{"json": path}]
    return c


BAD = [None, {"id": "empty", "conversations": []}, "not a dict", {"id": "typed", "conversations": [
    {"from": "human", "value": 5}, {"from": "gpt", "value": "x"}]}, {"id": "order", "conversations": [
    {"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}]


def test_bad_samples_are_reported_and_training_goes_on(tmp_path, caplog):
    import logging

    from vita_jax.data import sources
    from vita_jax.train import trainer
    path, tok, vocab = _official_setup(tmp_path, lambda good: BAD + good)
    with caplog.at_level(logging.WARNING, logger=sources.log.name):
        src = sources.OfficialJSON(path)
    warning = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert len(warning) == 1 and "5 of 9" in warning[0]
    for sid in ("mix.json#0", "empty", "mix.json#2", "typed", "order"):
        assert sid in warning[0]
    assert src[0]["_bad"] and src[1]["_bad"] and "_bad" not in src[5]
    out = trainer.train(_stage(path, tok, vocab, 3), str(tmp_path / "wd"), log=lambda *_: None, progress=False)
    assert out["steps"] == 3 and np.isfinite(out["last"]["loss"])
    assert out["skipped"] and set(out["skipped"]) <= {"mix.json#0", "empty", "mix.json#2", "typed", "order"}


def test_any_exception_in_one_sample_is_a_bad_sample(monkeypatch):
    from vita_jax.data import sources
    ex = sources.OfficialExamples(tokenizer=None, prep=None)

    def boom(*a, **k):
        raise ZeroDivisionError("something unexpected")
    monkeypatch.setattr(sources.text_lib, "encode_sample", boom)
    assert ex({"id": "x", "conversations": []})["bad"].startswith("ZeroDivisionError")
    assert ex(None) == {"id": "?", "bad": "TypeError: a sample must be a dict, got NoneType"}


def test_no_usable_sample_is_one_line(tmp_path):
    """Every sample bad: the file is named with its first problems, exit 2, instead of training on nothing."""
    import json
    import subprocess
    import sys
    path, tok, vocab = _official_setup(tmp_path, lambda good: BAD)
    r = subprocess.run([sys.executable, "-m", "vita_jax.cli", "train", "--config=stage2_2:tiny",
                        "--config.total_steps=2", f"--config.llm.vocab_size={vocab}", f"--config.data.tokenizer={tok}",
                        "--config.data.packing=false", "--config.data.mixture=" + json.dumps([{"json": path}]),
                        "--no-progress", "--workdir", str(tmp_path / "wd")], capture_output=True, text=True,
                       timeout=HANG_S)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("vita-jax: error: ") and path in line and "no usable sample" in line and "empty" in line


def test_steps_without_targets_stop_the_run(tmp_path):
    """Samples whose shape is fine but that all fail (a missing image): stops after max_empty_steps."""
    from vita_jax.train import trainer

    def missing(good):
        return [dict(s, id=f"m{k}", image="no_such.jpg", conversations=[
            dict(s["conversations"][0], value="<image>\n" + s["conversations"][0]["value"])] + s["conversations"][1:])
            for k, s in enumerate(good)]
    path, tok, vocab = _official_setup(tmp_path, missing)
    c = _stage(path, tok, vocab, 6)
    c.max_empty_steps = 2
    with pytest.raises(ValueError, match="2 steps in a row had no target tokens") as e:
        trainer.train(c, str(tmp_path / "wd"), log=lambda *_: None, progress=False)
    assert path in str(e.value)
    c.max_empty_steps, c.total_steps = 20, 2  # a run shorter than max_empty_steps: stopped at its end, no model
    with pytest.raises(ValueError, match="the whole run had no target tokens"):
        trainer.train(c, str(tmp_path / "wd2"), log=lambda *_: None, progress=False)
    assert not (tmp_path / "wd2" / "model").exists()
    with pytest.raises(ValueError, match="the whole run had no target tokens"):  # a rerun (nothing left to train)
        trainer.train(c, str(tmp_path / "wd2"), log=lambda *_: None, progress=False, return_state=False)
    assert not (tmp_path / "wd2" / "model").exists()  # still no untrained model that looks finished


# ------------------------------------------------------------------ a fresh probe's cases (CLI and prompts)
def _write(path, text):
    path.write_text(text)
    return str(path)


OK_SAMPLE = '[{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]'


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
        "mixture_key": (base + ['--config.data.mixture=[{"weight": 1}]', "--config.data.tokenizer=" + QWEN],
                        "config.data.mixture[0]"),
        "bad_json": (base + ['--config.data.mixture=[{"json": "%s"}]' % _write(tmp_path / "d.json", "[{"),
                            "--config.data.tokenizer=" + QWEN], "d.json"),
        # the tiny model's 512 ids cannot hold Qwen2.5's 151,665 (out-of-range ids trained to NaN, exit 0)
        "big_tokenizer": (base + ['--config.data.mixture=[{"json": "%s"}]' % _write(tmp_path / "ok.json", OK_SAMPLE),
                                 "--config.data.tokenizer=" + QWEN],
                          f"config.data.tokenizer = {QWEN} has 151665 tokens, more than config.llm.vocab_size = 512"),
    }[case]
    line = _cli_error(capsys, *args)
    assert named in line
    assert "processes:" not in capsys.readouterr().out  # refused before any model was built


@pytest.mark.parametrize("opts, named", [
    (("--ids", "1,abc"), "--ids"),
    (("--ids", "1,2", "--image", "a.png"), "--ids"),
    (("--prompt", "  "), "--prompt is empty"),
    (("--prompt", "hi", "--speak", "/no/such/dir/out.wav"), "/no/such/dir"),
])
def test_generate_mistakes_before_loading(capsys, opts, named):
    line = _cli_error(capsys, "generate", "/no/such/model", *opts)
    assert named in line and "/no/such/model" not in line


def test_bad_dtype_and_budget_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "/no/such/model", "--prompt", "hi", "--dtype", "float12"])
    assert e.value.code == 2 and "--dtype" in capsys.readouterr().err
    assert "--budget-minutes" in _cli_error(capsys, "demo", "--budget-minutes", "-1")


@pytest.mark.parametrize("messages, named", [
    ([("robot", "hi")], "role 'robot'"), ([("user", "hi"), ("assistant", "yo")], "last turn"),
    (7, "got int"), ([], "non-empty"), ("a \ud800 b", "not valid Unicode"), ([("user", 5)], "messages[0]"),
    ("", "nothing to answer"),
])
def test_chat_messages_are_checked(messages, named):
    from vita_jax.data import chat
    with pytest.raises(ValueError, match=named.replace("[", r"\[").replace("]", r"\]")):
        chat.check_messages(messages)
    chat.check_messages("", media=True)  # an empty question about an image or a clip is fine


def test_top_k_over_the_vocabulary_is_no_filter():
    import jax
    logits = np.asarray([[0.0, 1.0, 5.0, 2.0]], np.float32)
    key = jax.random.PRNGKey(0)
    assert np.array_equal(gen.sample_logits(logits, key, True, 1.0, 10 ** 8, 1.0),
                          gen.sample_logits(logits, key, True, 1.0, 0, 1.0))


def test_release_config_json_is_checked(tmp_path):
    import json
    import shutil

    from vita_jax.convert import release
    d = tmp_path / "rel"
    shutil.copytree(TINY, d)
    (d / "config.json").write_text("64")
    with pytest.raises(ValueError, match="expected a JSON object"):
        release.read_config(str(d))
    hf = json.load(open(f"{TINY}/config.json"))
    (d / "config.json").write_text(json.dumps(dict(hf, hidden_size="sixty-four")))
    with pytest.raises(ValueError, match="'hidden_size' = 'sixty-four'"):
        release.read_config(str(d))


def test_multi_line_messages_become_one_line(capsys, monkeypatch):
    def boom(argv):
        raise ValueError("train.yaml: bad YAML\n  in line 3\n  column 7")
    monkeypatch.setattr(cli, "run", boom)
    line = _cli_error(capsys, "generate")
    assert line == "vita-jax: error: train.yaml: bad YAML (more with --debug)"


def test_init_from_of_another_size_is_named(tmp_path, capsys):
    line = _cli_error(capsys, "train", "--config=stage1_2:tiny", f"--config.init_from={TINY}",
                      "--config.llm.hidden_size=32", "--workdir", str(tmp_path / "wd"))
    assert "config.init_from" in line and "shape" in line


def test_weights_and_ids_of_any_kind(tmp_path):
    from vita_jax.data import pipeline
    with pytest.raises(ValueError, match=r"config.data.mixture\[0\]: weight -1"):
        pipeline.mixture([{"json": "x.json", "weight": -1}])

