"""Official JSON sources (vita_jax/data/sources.py): bad samples are reported by id and training goes on,
media paths stay inside their media root, unreadable files are one line naming the file."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from vita_jax.data import image as I
from vita_jax.data import pipeline, sources
from vita_jax.data.batch import Preprocess

from conftest import demo_tokenizer, run_cli

# --------------------------------------------- refused early, nothing lost (slow, as the old test_hardening.py was)


def _official_setup(root, samples_fn):
    """A tokenizer over DemoData's text QA and one official file: ``samples_fn(good samples)``."""
    import vita_jax.demo.data as demo_data  # the demo's writer: imported by the tests that use it
    d = demo_data.DemoData(str(root), demo_data.Speech("recordings"), n_train=4)
    good = json.load(open(d.text_qa("train", 4)))
    vocab = demo_tokenizer([m["value"] for s in good for m in s["conversations"]], str(root / "tok"))
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


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
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


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
def test_any_exception_in_one_sample_is_a_bad_sample(monkeypatch):
    from vita_jax.data import sources
    ex = sources.OfficialExamples(tokenizer=None, prep=None)

    def boom(*a, **k):
        raise ZeroDivisionError("something unexpected")
    monkeypatch.setattr(sources.text_lib, "encode_sample", boom)
    assert ex({"id": "x", "conversations": []})["bad"].startswith("ZeroDivisionError")
    assert ex(None) == {"id": "?", "bad": "TypeError: a sample must be a dict, got NoneType"}


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
def test_no_usable_sample_is_one_line(tmp_path):
    """Every sample bad: the file is named with its first problems, exit 2, instead of training on nothing."""
    path, tok, vocab = _official_setup(tmp_path, lambda good: BAD)
    r = run_cli("train", "--config=stage2_2:tiny", "--config.total_steps=2", f"--config.llm.vocab_size={vocab}",
                f"--config.data.tokenizer={tok}", "--config.data.packing=false",
                "--config.data.mixture=" + json.dumps([{"json": path}]), "--no-progress",
                "--workdir", str(tmp_path / "wd"))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("vita-jax: error: ") and path in line and "no usable sample" in line and "empty" in line


@pytest.mark.slow  # as when test_hardening.py was slow as a whole
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


# ---------------------------------------------------------- refused early, one line naming the file, field or option


def test_data_file_that_is_not_utf8_names_the_file(tmp_path):
    from vita_jax.data import sources
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"id": "a", "conversations": [{"from": "human", "value": "h\xe9"}]}]'.encode("latin1"))
    with pytest.raises(ValueError, match=f"{path}: cannot read the data file: 'utf-8' codec"):
        sources.OfficialJSON(str(path))


# ------------------------------------------------------------------ media that cannot work: one line naming the file


@pytest.fixture
def tree(tmp_path):
    """``root/`` (media root: a.png, sub/b.png, a symlink out, a symlink in) beside ``outside/x.png``."""
    root, out = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    out.mkdir()
    for p in (root / "a.png", root / "sub" / "b.png", out / "x.png"):
        Image.new("RGB", (30, 20), (200, 10, 10)).save(p)
    os.symlink(out / "x.png", root / "link_out.png")
    os.symlink(root / "sub" / "b.png", root / "link_in.png")
    return root, out


def _sample(sid, image, **kw):
    return dict(id=sid, image=image, conversations=[{"from": "human", "value": "<image>\nWhat?"},
                                                    {"from": "gpt", "value": "Red."}], **kw)


@pytest.fixture(scope="module")
def transform(qwen_tokenizer):
    prep = Preprocess(I.ImageProcessorConfig(size=28, crop_size=28), max_tiles=1)
    return sources.OfficialExamples(qwen_tokenizer, prep)


def test_media_paths_stay_inside_the_media_root(tree, transform):
    root, out = tree
    samples = [_sample("abs", str(out / "x.png")), _sample("dotdot", "../outside/x.png"),
               _sample("link", "link_out.png"), _sample("set-escape", "x.png", set="../outside"),
               _sample("plain", "a.png"), _sample("inside", "sub/../sub/b.png"), _sample("link-in", "link_in.png"),
               _sample("set", "b.png", set="sub"), _sample("declared", "x.png", set="ext")]
    path = root / "data.json"
    path.write_text(json.dumps(samples))
    src = sources.OfficialJSON(str(path), str(root), sets={"ext": str(out)})
    got = {s["id"]: transform(src[i]) for i, s in enumerate(samples)}
    for sid in ("abs", "dotdot", "link", "set-escape"):
        assert set(got[sid]) == {"id", "bad"}, sid
        assert "outside the media root" in got[sid]["bad"] and "allow_outside_root" in got[sid]["bad"]
    assert "absolute" in got["abs"]["bad"] and str(out / "x.png") in got["link"]["bad"]
    for sid in ("plain", "inside", "link-in", "set", "declared"):  # a declared set folder is its own root
        assert "bad" not in got[sid] and got[sid]["pixels"].shape == (1, 3, 28, 28), got[sid]
    # allowed explicitly: the same samples all work
    src = sources.OfficialJSON(str(path), str(root), sets={"ext": str(out)}, allow_outside_root=True)
    assert all("bad" not in transform(src[i]) for i in range(len(samples)))


def test_mixture_option_per_entry_and_config(tree, transform):
    root, out = tree
    path = root / "data.json"
    path.write_text(json.dumps([_sample("dotdot", "../outside/x.png")]))
    entry = dict(json=str(path), media_root=str(root))
    assert "bad" in transform(pipeline.mixture([entry])[0])
    assert "bad" not in transform(pipeline.mixture([dict(entry, allow_outside_root=True)])[0])
    assert "bad" not in transform(pipeline.mixture([entry], allow_outside_root=True)[0])  # the config's default
    assert "bad" in transform(pipeline.mixture([dict(entry, allow_outside_root=False)], allow_outside_root=True)[0])
    from vita_jax.train import stages
    assert stages.stage_config("1.3", "tiny").data.allow_outside_media_root is False
