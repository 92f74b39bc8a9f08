"""Training faults and checkpoints: an unrestorable newest checkpoint falls back to the previous one (kept,
renamed), leftovers of killed saves and exports are removed with a message, a finished run whose
``model/`` export failed writes it on the next run, and nothing is deleted that vita_jax did not write."""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import file_tree, run_cli

pytestmark = pytest.mark.slow  # minutes: outside the quick loop (pytest -m "not slow")

STEPS = 4


def _config(steps=STEPS):
    from vita_jax.train import stages
    c = stages.stage_config("1.1", "tiny")
    c.total_steps, c.checkpoint_every, c.keep_checkpoints = steps, 2, 5
    return c


def _steps(wd):
    return sorted(int(n) for n in os.listdir(os.path.join(wd, "ckpt")) if n.isdigit())


def _metrics(wd):
    return [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def failed_export(tmp_path_factory):
    """A run that trained to the end but whose final ``model/`` export failed (the disk filled up)."""
    from vita_jax.train import program, trainer
    wd = str(tmp_path_factory.mktemp("failed_export") / "wd")
    real = program.export_model

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    program.export_model = boom
    try:
        with pytest.raises(OSError, match="No space left"):
            trainer.train(_config(), wd, log=lambda *_: None, progress=False)
    finally:
        program.export_model = real
    assert _steps(wd)[-1] == STEPS and not os.path.exists(os.path.join(wd, "model"))
    assert [r["step"] for r in _metrics(wd)] == list(range(1, STEPS + 1))
    return wd


def _copy(src, tmp_path):
    dst = str(tmp_path / "wd")
    shutil.copytree(src, dst)
    return dst


def _truncate_arrays(wd, step):
    """Halves every array file of checkpoint ``step`` (a disk that lost the end of the files)."""
    d = os.path.join(wd, "ckpt", str(step), "state", "ocdbt.process_0", "d")
    for f in os.listdir(d):
        p = os.path.join(d, f)
        with open(p, "r+b") as fh:
            fh.truncate(os.path.getsize(p) // 2)


def test_unrestorable_newest_checkpoint_falls_back(failed_export, tmp_path):
    """Checkpoint 4 truncated: one line says so, the run resumes from 2 (same losses as the first time),
    checkpoint 4 is kept as 4.unusable-<time> and a new step 4 is saved and exported."""
    from vita_jax.train import trainer
    from vita_jax.train.run_checkpoint import Checkpointer
    wd = _copy(failed_export, tmp_path)
    before = _metrics(wd)
    _truncate_arrays(wd, STEPS)
    lines = []
    out = trainer.train(_config(), wd, log=lines.append, progress=False)
    ckdir = os.path.join(wd, "ckpt")
    said = [s for s in lines if "cannot be restored" in s]
    assert len(said) == 1 and said[0].startswith(f"checkpoint {STEPS} in {ckdir} cannot be restored (")
    assert "; resuming from 2 " in said[0] and "\n" not in said[0]
    aside = [n for n in os.listdir(ckdir) if n.startswith(f"{STEPS}.unusable-")]
    assert len(aside) == 1 and aside[0] in said[0]
    assert out["steps"] == STEPS and _steps(wd)[-1] == STEPS  # step 4 saved again
    assert [r["loss"] for r in _metrics(wd)] == [r["loss"] for r in before]  # resumed exactly
    ck = Checkpointer(ckdir)
    assert ck.latest_step() == STEPS
    ck.restore(STEPS, out["state"])  # the new step 4 restores
    ck.close()
    assert os.path.isfile(os.path.join(wd, "model", "vita_jax.json"))


def test_no_restorable_checkpoint_is_one_line_and_changes_nothing(failed_export, tmp_path):
    from vita_jax.train import trainer
    wd = _copy(failed_export, tmp_path)
    for step in _steps(wd):
        _truncate_arrays(wd, step)
    before = file_tree(wd)
    with pytest.raises(ValueError, match="no checkpoint in .* can be restored") as e:
        trainer.train(_config(), wd, log=lambda *_: None, progress=False)
    msg = str(e.value)
    assert os.path.join(wd, "ckpt") in msg and "\n" not in msg and f"checkpoint {STEPS}:" in msg
    assert file_tree(wd) == before  # nothing moved, deleted or written


def _cli(wd, steps=STEPS, *extra):
    return run_cli("train", "--config=stage1_1:tiny", f"--config.total_steps={steps}", "--config.checkpoint_every=2",
                   "--no-progress", "--workdir", wd, *extra, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_rerun_after_failed_export_writes_the_model(failed_export, tmp_path):
    """Through the CLI: leftovers of a killed save and a killed export are removed (one line each), the
    missing model/ is written from checkpoint 4 without training; a second rerun does nothing, exit 0."""
    wd = _copy(failed_export, tmp_path)
    orbax_tmp = os.path.join(wd, "ckpt", "6.orbax-checkpoint-tmp-1700000000123456")
    export_tmp = os.path.join(wd, "model.partial-k1ll3d_x")
    mine = os.path.join(wd, "model.partial-notes")  # not a name vita_jax writes: kept
    for d in (orbax_tmp, os.path.join(export_tmp, "params"), mine):
        os.makedirs(d)
    metrics = open(os.path.join(wd, "metrics.jsonl")).read()
    r = _cli(wd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert f"removing {os.path.basename(orbax_tmp)}, left by an interrupted checkpoint save" in r.stdout
    assert f"removed {os.path.basename(export_tmp)}, left by an interrupted write" in r.stdout
    assert "missing or incomplete (an interrupted export): writing it from that checkpoint" in r.stdout
    assert not os.path.exists(orbax_tmp) and not os.path.exists(export_tmp) and os.path.isdir(mine)
    assert os.path.isfile(os.path.join(wd, "model", "vita_jax.json"))
    assert open(os.path.join(wd, "metrics.jsonl")).read() == metrics  # nothing trained again
    import vita_jax
    from vita_jax.train import run_checkpoint
    m = vita_jax.from_pretrained(os.path.join(wd, "model"))
    ck = run_checkpoint.Checkpointer(os.path.join(wd, "ckpt"))
    raw = ck.mgr.restore(STEPS)["state"]
    ck.close()
    np.testing.assert_array_equal(np.asarray(m.params["mm_projector"]["0"]["kernel"]),
                                  np.asarray(raw["train"]["mm_projector/0/kernel"]))
    before = file_tree(wd)
    r = _cli(wd)
    assert r.returncode == 0 and "already finished" in r.stdout and "nothing to do" in r.stdout, r.stderr[-3000:]
    assert file_tree(wd) == before


def test_total_steps_below_the_newest_checkpoint_is_refused(failed_export, tmp_path):
    wd = _copy(failed_export, tmp_path)
    before = file_tree(wd)
    r = _cli(wd, 3)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("vita-jax: error: config.total_steps = 3") and os.path.join(wd, "ckpt") in line
    assert file_tree(wd) == before


def test_another_model_or_stage_in_the_same_workdir_is_refused(failed_export, tmp_path):
    """Checkpoints of stage 1.1 and a stage 1.2 (or another model size) rerun on them: one line naming the
    work dir and the differing fields, before any model is built; no orbax or asyncio noise; nothing changed."""
    from vita_jax.train import trainer
    wd = _copy(failed_export, tmp_path)
    before = file_tree(wd)
    r = run_cli("train", "--config=stage1_2:tiny", f"--config.total_steps={STEPS + 2}", "--no-progress",
                "--workdir", wd, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert r.returncode == 2, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vita-jax: error: {os.path.join(wd, 'ckpt')} holds checkpoint "
                                                   f"{STEPS} of another run ("), r.stderr
    assert "config.stage: '1.1' -> '1.2'" in lines[0] and "config.trainable: " in lines[0]
    assert "processes:" not in r.stdout  # refused before the model was built
    assert file_tree(wd) == before
    c = _config()
    c.llm.intermediate_size = 256
    with pytest.raises(ValueError, match=r"config.llm.intermediate_size: 128 -> 256\)"):
        trainer.train(c, wd, log=lambda *_: None, progress=False)
    assert file_tree(wd) == before


def test_run_settings_may_change_between_runs():
    """Only what shapes the train state is compared: steps, checkpoints, data, evals, mesh and dither may change."""
    from vita_jax.train.run_checkpoint import config_changes
    c = _config()
    saved = json.loads(c.to_json())
    c.total_steps, c.checkpoint_every, c.data.seq_len, c.audio.dither, c.optim.lr = 9, 3, 64, 0.1, 1e-3
    c.mesh_shape.fsdp, c.evals = 2, {"asr": {"every": 5}}
    assert config_changes(saved, json.loads(c.to_json())) == []
    c.trainable, c.optim.group_lrs = ["llm/.*"], [["llm/.*", 1e-4]]
    assert config_changes(saved, json.loads(c.to_json())) == [
        "config.trainable: ['mm_projector/.*'] -> ['llm/.*']", "config.optim.group_lrs: [] -> [['llm/.*', 0.0001]]"]


@pytest.mark.parametrize("uncommitted", [True, False])
def test_restored_state_lowers_like_a_fresh_one(tmp_path, uncommitted):
    """Without a mesh the trainer restores the state uncommitted (``uncommitted=True``), as a fresh one is, so a
    resumed run's step is the saving run's program, read back from the persistent compilation cache; a committed
    state (the other branch, a mesh run's restore) lowers with explicit shardings: another program."""
    import jax
    import jax.numpy as jnp

    from vita_jax.train import run_checkpoint
    fresh = jax.jit(lambda: {"w": jnp.ones((4, 3)), "step": jnp.zeros((), jnp.int32)})()
    ck = run_checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ck.save(1, fresh, force=True)
    restored, _ = ck.restore(1, fresh, uncommitted=uncommitted)
    ck.close()
    step = jax.jit(lambda s: {"w": s["w"] * 2, "step": s["step"] + 1}, donate_argnums=0)
    assert np.array_equal(restored["w"], fresh["w"]) and int(restored["step"]) == 0
    assert (step.lower(restored).as_text() == step.lower(fresh).as_text()) == uncommitted
