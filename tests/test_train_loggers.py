"""W&B beside TensorBoard (``config.wandb``): checked before anything runs, a clear line when wandb is missing,
every scalar TensorBoard gets mirrored, the same W&B run continued on a rerun (offline mode: no network)."""
import glob
import importlib.util
import json
import os

import pytest

from vita_jax.train import loggers


def _config(**wandb):
    from vita_jax.train import stages
    c = stages.stage_config("1.1", "tiny")
    c.total_steps, c.checkpoint_every = 2, 100
    c.wandb = wandb
    return c


def test_settings_checked():
    assert loggers.wandb_settings(_config()) == {}
    with pytest.raises(ValueError, match=r"^config.wandb: unknown key\(s\) projet "):
        loggers.wandb_settings(_config(projet="p"))
    with pytest.raises(ValueError, match=r"^config.wandb.mode = 'offlin': must be one of online, offline, disabled"):
        loggers.wandb_settings(_config(project="p", mode="offlin"))


def test_missing_wandb_is_one_line_before_anything_runs(tmp_path, monkeypatch):
    from vita_jax.train import trainer
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ImportError, match=r"^config.wandb is set but wandb is not installed: pip install ") as e:
        trainer.train(_config(project="p"), str(tmp_path / "wd"), log=lambda *_: None, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "wd").exists()


@pytest.mark.slow  # two tiny runs (~1.5 min)
def test_offline_run_mirrors_tensorboard_and_resumes_the_same_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from vita_jax.train import trainer
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    rows, inits, real_log, real_init = [], [], wandb.sdk.wandb_run.Run.log, wandb.init

    def log(self, data, *a, **k):
        rows.append(dict(data))
        return real_log(self, data, *a, **k)

    def init(*a, **k):
        inits.append(k)
        return real_init(*a, **k)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
    monkeypatch.setattr(wandb, "init", init)
    wd = str(tmp_path)
    trainer.train(_config(project="vita-jax-tests", name="tiny"), wd, log=lambda *_: None, progress=False)
    run_id = open(os.path.join(wd, "wandb_run_id")).read().strip()
    assert inits[0]["id"] == run_id and inits[0]["resume"] == "allow" and inits[0]["project"] == "vita-jax-tests"
    metrics = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    want = [dict({f"train/{k}": v for k, v in m.items() if k not in ("step", "finite")}, step=m["step"])
            for m in metrics]
    assert rows == want  # every scalar TensorBoard got, one row a step
    c = _config(project="vita-jax-tests", name="tiny")
    c.total_steps = 3
    trainer.train(c, wd, log=lambda *_: None, progress=False)
    assert inits[1]["id"] == run_id and rows[-1]["step"] == 3
    offline = glob.glob(os.path.join(wd, "wandb", "offline-run-*"))
    assert len(offline) == 2 and all(d.endswith("-" + run_id) for d in offline)
