"""The path layer (vita_jax/paths.py) against a non-local filesystem, offline: ``gs://`` URLs are
served by fsspec's in-memory filesystem (the fixture registers it as fsspec's ``gcs``
implementation, which is what etils.epath routes ``gs://`` to). Production code is unchanged.

Orbax cannot be tested there: it writes the arrays with tensorstore, whose own ``gs://`` driver
talks HTTP to Google Cloud Storage and never goes through fsspec. So the fixture also replaces
``paths.for_orbax`` (what orbax is given) with a map from ``gs://`` URLs to a local folder: the
trainer's orbax files (``ckpt/``, ``model/params``) land there, everything else in memory."""
import importlib
import json
import os

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from vita_jax import paths


class _GsMemory(MemoryFileSystem):
    """fsspec memory, answering ``gs://bucket/key`` as ``/bucket/key`` in its own store."""
    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for p in ("gs://", "gcs://"):
            if path.startswith(p):
                path = path[len(p):]
        return MemoryFileSystem._strip_protocol(path)


@pytest.fixture
def gs_memory(monkeypatch, tmp_path):
    registry = importlib.import_module("fsspec.registry")._registry  # the module (fsspec.registry is its proxy)
    monkeypatch.setitem(registry, "gcs", _GsMemory)
    epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    orbax_root = tmp_path / "orbax-gs"

    def for_orbax(path):
        path = os.fspath(path)
        if not path.startswith("gs://"):
            return os.path.abspath(path)
        local = os.path.join(orbax_root, path[len("gs://"):])
        os.makedirs(os.path.dirname(local), exist_ok=True)
        return local

    monkeypatch.setattr(paths, "for_orbax", for_orbax)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    _GsMemory.store.clear()
    del _GsMemory.pseudo_dirs[1:]
    yield _GsMemory.store
    assert not os.listdir(cwd), "a local folder appeared for a URL"
    _GsMemory.store.clear()
    del _GsMemory.pseudo_dirs[1:]
    epath_backend._FileSystemSpecBackend._get_filesystem.cache_clear()


def test_helpers_on_a_url(gs_memory, tmp_path):
    base = "gs://bucket/x"
    assert not paths.is_local(base) and paths.is_local(str(tmp_path)) and paths.is_local("rel/dir")
    assert paths.join(base, "a", "b.txt") == "gs://bucket/x/a/b.txt"
    paths.makedirs(paths.join(base, "a", "b"))
    with paths.open(paths.join(base, "a", "t.txt"), "w") as f:
        f.write("hi\n")
    with paths.open(paths.join(base, "a", "b", "y.bin"), "wb") as f:
        f.write(b"\0\1")
    assert paths.exists(paths.join(base, "a", "t.txt")) and paths.isdir(paths.join(base, "a"))
    assert sorted(paths.listdir(paths.join(base, "a"))) == ["b", "t.txt"]
    assert "/bucket/x/a/t.txt" in gs_memory  # it went to the memory filesystem
    with paths.local_copy(paths.join(base, "a"), skip=("t.txt",)) as d:
        assert os.listdir(d) == ["b"] and open(os.path.join(d, "b", "y.bin"), "rb").read() == b"\0\1"
    assert not os.path.exists(d)

    log = paths.join(base, "m.jsonl")
    with paths.appender(log) as f:
        f.write("1\n")
        f.flush()
    with paths.appender(log) as f:  # continues what is there
        f.writelines(["2\n"])
    assert paths.open(log).read() == "1\n2\n"
    with paths.appender(log, every_s=0.0) as f:  # a due flush uploads before close
        f.write("3\n")
        f.flush()
        assert paths.open(log).read() == "1\n2\n3\n"

    st = paths.Staged(paths.join(base, "tb"), every_s=3600)
    open(os.path.join(st.local, "ev"), "w").write("e")
    st.sync()  # not due yet
    assert not paths.exists(paths.join(base, "tb", "ev"))
    st.close()
    assert paths.open(paths.join(base, "tb", "ev")).read() == "e" and not os.path.exists(st.local)

    paths.rmtree(paths.join(base, "a"))
    paths.rmtree(paths.join(base, "never"))
    assert not paths.exists(paths.join(base, "a", "t.txt"))


def test_local_paths_are_plain_files(tmp_path):
    d = str(tmp_path / "w")
    assert paths.for_orbax("rel") == os.path.abspath("rel")
    paths.makedirs(d)
    with paths.appender(os.path.join(d, "m")) as f:
        assert type(f).__name__ == "TextIOWrapper"  # exactly open(path, "a")
    st = paths.Staged(d)
    assert st.local == d
    st.close()
    assert os.path.isdir(d)


@pytest.mark.slow  # a minute or more on 2 cores: outside the quick loop
def test_trainer_on_a_url_workdir_and_resume(gs_memory, tmp_path):
    from vita_jax.convert import model_checkpoint, orbax_io
    from vita_jax.train import run_checkpoint as ckpt_lib
    from vita_jax.train import stages, trainer
    c = stages.stage_config("1.1", "tiny")
    c.total_steps, c.checkpoint_every = 4, 2
    wd = "gs://bucket/run"
    logs = []
    out = trainer.train(c, wd, log=logs.append, progress=False, stop_after=2)
    assert out["steps"] == 2
    metrics = paths.join(wd, "metrics.jsonl")
    assert [json.loads(x)["step"] for x in paths.open(metrics)] == [1, 2]
    assert "/bucket/run/metrics.jsonl" in gs_memory
    ck = ckpt_lib.Checkpointer(paths.join(wd, "ckpt"))
    assert ck.latest_step() == 2
    ck.close()
    assert not orbax_io.is_orbax_checkpoint(paths.join(wd, "model"))

    out = trainer.train(c, wd, log=logs.append, progress=False)  # resumes from step 2
    assert "resumed from step 2" in logs and out["steps"] == 4
    assert [json.loads(x)["step"] for x in paths.open(metrics)] == [1, 2, 3, 4]
    events = [f for f in paths.listdir(paths.join(wd, "tb")) if f.startswith("events.out.tfevents")]
    assert events and all(b"train/loss" in paths.open(paths.join(wd, "tb", e), "rb").read() for e in events)
    model = paths.join(wd, "model")
    assert "/bucket/run/model/vita_jax.json" in gs_memory and orbax_io.is_orbax_checkpoint(model)
    ck = model_checkpoint.load(model)
    np.testing.assert_array_equal(np.asarray(ck.params["mm_projector"]["0"]["kernel"]),
                                  np.asarray(out["state"].train["mm_projector/0/kernel"]))
    assert not any(k.startswith("/bucket/run/ckpt") for k in gs_memory)  # orbax's arrays: the local map
    assert os.path.isdir(tmp_path / "orbax-gs" / "bucket" / "run" / "ckpt" / "4")


def test_model_with_tokenizer_and_speech_saves_to_and_loads_from_a_url(gs_memory, tiny_dir, tmp_path):
    """The exporter's extras (tokenizer files, the torch .pt files of vita_tts_ckpt, written into a
    local folder) are uploaded; loading from the URL reads them back through a local copy."""
    from tokenizers import Tokenizer, models

    import vita_jax
    from vita_jax.data.text import TextTokenizer
    tok_file = str(tmp_path / "tokenizer.json")
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(tok_file)
    m = vita_jax.from_pretrained(tiny_dir)
    m.tokenizer = TextTokenizer.from_file(tok_file)
    url = "gs://bucket/m"
    m.save_pretrained(url, format="orbax")
    assert {"/bucket/m/vita_jax.json", "/bucket/m/tokenizer.json",
            "/bucket/m/vita_tts_ckpt/decoder/final.pt"} <= set(gs_memory)
    with pytest.raises(FileExistsError):
        m.save_pretrained(url, format="orbax")
    back = vita_jax.from_pretrained(url)
    assert back.tokenizer is not None and back.tokenizer.path == url + "/tokenizer.json" and back.speech is not None
    np.testing.assert_array_equal(np.asarray(back.params["mm_projector"]["0"]["kernel"]),
                                  np.asarray(m.params["mm_projector"]["0"]["kernel"]))


def test_release_format_refuses_a_url(tmp_path):
    from vita_jax.convert import target
    with pytest.raises(ValueError, match="local disk"):
        target.prepare_target("gs://bucket/release", overwrite=True)
    assert not os.path.exists("gs:")


def test_staged_tensorboard_uploads_periodically(gs_memory):
    from vita_jax.train import tensorboard
    tb = tensorboard.writer("gs://bucket/tbrun")
    tb.staged.every_s = 0.0  # every write is due
    tb.add_scalar("train/loss", 1.0, 1)
    assert any(k.startswith("/bucket/tbrun/tb/events.out.tfevents") for k in gs_memory)  # before close
    tb.close()
