"""The training loop: metrics.jsonl, checkpoints, and exact resume after SIGKILL, SIGTERM and SIGINT."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import HANG_S, REPO, TINY

pytestmark = pytest.mark.slow  # minutes: outside the quick loop (pytest -m "not slow")

STEPS = 12
CMD = [sys.executable, "-m", "vita_jax.cli", "train", "--config=stage1_1:tiny",
       f"--config.total_steps={STEPS}", "--config.checkpoint_every=3", "--no-progress"]


def _run(workdir, kill_at=None, cmd=CMD, sig=signal.SIGKILL):
    """Runs the CLI to the end (exit 0 asserted), or sends ``sig`` once ``metrics.jsonl`` has ``kill_at`` lines;
    returns ``(exit code, output)``."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.Popen(cmd + ["--workdir", str(workdir)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    if kill_at is None:
        out, _ = p.communicate(timeout=HANG_S)
        assert p.returncode == 0, out[-3000:]
        return p.returncode, out
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + HANG_S
    while time.time() < deadline and p.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= kill_at:
            break
        time.sleep(0.05)
    p.send_signal(sig)
    out, _ = p.communicate(timeout=HANG_S)
    return p.returncode, out


def _losses(workdir, steps=STEPS):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    return [r["loss"] for r in rows]


def _final(workdir, steps=STEPS):
    mgr = ocp.CheckpointManager(os.path.join(workdir, "ckpt"))
    assert mgr.latest_step() == steps
    out = mgr.restore(steps, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mgr.close()
    import jax
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(out["state"])[0]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("uninterrupted")
    _run(d)
    return _losses(d), _final(d)


# killed twice (early, before the first checkpoint is past; and again after resuming): one run covers both
@pytest.mark.parametrize("kill_points", [(2, 8)])
def test_sigkill_resume_bitwise(reference, tmp_path, kill_points):
    for k in kill_points:
        _run(tmp_path, kill_at=k)
    _run(tmp_path)
    ref_losses, ref_params = reference
    assert _losses(tmp_path) == ref_losses  # bitwise: floats equal exactly
    got = _final(tmp_path)
    assert got.keys() == ref_params.keys()
    for k in got:
        assert np.array_equal(got[k], ref_params[k]), k


# SIGINT takes the same handler (vita_jax/train/preemption.py); test_train_preemption.py sends it to a library run
@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_signal_saves_the_step_and_resume_is_bitwise(reference, tmp_path, sig):
    """SIGTERM (a preemption notice): the step in flight is finished and checkpointed, one line says so, the exit
    code is 128 + the signal's number; the rerun resumes from that step and equals the run that was never
    interrupted."""
    rc, out = _run(tmp_path, kill_at=1, sig=sig)
    assert rc == 128 + sig and "Traceback" not in out, out[-3000:]
    line = out.strip().splitlines()[-1]
    ckdir = os.path.join(tmp_path, "ckpt")
    assert line.startswith(f"vita-jax: stopped by {sig.name} after step ") and ckdir in line, out[-3000:]
    step = int(line.split(" after step ")[1].split(":")[0])
    assert 1 <= step < STEPS and line.endswith("; rerun the same command to resume")
    assert max(int(n) for n in os.listdir(ckdir) if n.isdigit()) == step  # saved though not a multiple of 3
    assert [json.loads(r)["step"] for r in open(tmp_path / "metrics.jsonl")] == list(range(1, step + 1))
    _, out = _run(tmp_path)
    assert f"resumed from step {step}" in out
    ref_losses, ref_params = reference
    assert _losses(tmp_path) == ref_losses  # bitwise: floats equal exactly
    got = _final(tmp_path)
    assert got.keys() == ref_params.keys() and all(np.array_equal(got[k], ref_params[k]) for k in got)


def test_sigkill_resume_bitwise_packed(tmp_path_factory):
    """Stage 2.2 on official files (images, spoken questions, text), packed rows with budgets sized
    from the data and the pipeline running ahead: killed mid-run and resumed, it equals the run
    that was never interrupted."""
    from conftest import demo_mixture
    root = tmp_path_factory.mktemp("packed_data")
    files, tok, vocab = demo_mixture(root, 24)
    steps = 8
    cmd = [sys.executable, "-m", "vita_jax.cli", "train", "--config=stage2_2:tiny",
           f"--config.total_steps={steps}", "--config.checkpoint_every=2", "--no-progress",
           f"--config.llm.vocab_size={vocab}", f"--config.data.tokenizer={tok}",
           "--config.data.mixture=" + json.dumps([{"json": f} for f in files]), "--config.data.packing=true",
           "--config.data.budgets=auto", "--config.data.calibration_examples=24", "--config.data.seq_len=256",
           "--config.data.max_frames=800", "--config.data.workers=2"]
    ref = tmp_path_factory.mktemp("packed_ref")
    _run(ref, cmd=cmd)
    killed = tmp_path_factory.mktemp("packed_killed")
    _run(killed, kill_at=3, cmd=cmd)
    _run(killed, cmd=cmd)
    assert _losses(killed, steps) == _losses(ref, steps)
    a, b = _final(killed, steps), _final(ref, steps)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_metrics_and_checkpoints(reference, tmp_path):
    losses, params = reference
    assert losses[-1] < losses[0]
    assert any("mm_projector" in k for k in params) and not any("vision_tower" in k for k in params if "train" in k)


def test_next_stage_starts_from_previous_parameters(tmp_path):
    import vita_jax
    from vita_jax.train import stages, trainer
    c = stages.stage_config("1.1", "tiny")
    c.total_steps, c.checkpoint_every = 3, 100
    out = trainer.train(c, str(tmp_path / "s11"), log=lambda *_: None, progress=False)
    m = vita_jax.from_pretrained(str(tmp_path / "s11" / "model"))
    np.testing.assert_array_equal(np.asarray(m.params["mm_projector"]["0"]["kernel"]),
                                  np.asarray(out["state"].train["mm_projector/0/kernel"]))
    c2 = stages.stage_config("1.2", "tiny")
    c2.total_steps, c2.checkpoint_every = 2, 100
    c2.init_from = str(tmp_path / "s11" / "model")
    out2 = trainer.train(c2, str(tmp_path / "s12"), log=lambda *_: None, progress=False)
    assert out2["steps"] == 2 and int(out2["state"].step) == 2  # fresh optimizer, fresh step count


def test_flops_count_frozen_towers_forward_only():
    from vita_jax.train import flops, stages
    c11, c12 = stages.stage_config("1.1", "tiny"), stages.stage_config("1.2", "tiny")
    f11 = flops.step_flops(c11, 4, 128, tiles=4, audio_frames=400)
    f12 = flops.step_flops(c12, 4, 128, tiles=4, audio_frames=400)
    f12_no_img = flops.step_flops(c12, 4, 128, tiles=0, audio_frames=400)
    f11_no_img = flops.step_flops(c11, 4, 128, tiles=0, audio_frames=400)
    vit_11, vit_12 = f11 - f11_no_img, f12 - f12_no_img   # the ViT (+ projector) share of each stage
    assert vit_12 > vit_11 > 0   # trained ViT: forward + backward; frozen ViT: forward only


def test_tensorboard_and_throughput_logged(tmp_path):
    from vita_jax.train import stages, trainer
    c = stages.stage_config("1.2", "tiny")
    c.total_steps, c.checkpoint_every = 2, 100
    trainer.train(c, str(tmp_path), log=lambda *_: None, progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(r["tokens_per_s"] > 0 and r["tflops_per_s"] > 0 for r in rows)
    events = [f for f in os.listdir(tmp_path / "tb") if f.startswith("events.out.tfevents")]
    assert events and b"train/loss" in open(tmp_path / "tb" / events[0], "rb").read()


@pytest.mark.parametrize("stage", ["1_1", "1_2", "1_3", "2_1a", "2_1b", "2_2", "3_2"])
def test_every_stage_config_trains_tiny(stage, tmp_path):
    """``stage*:tiny`` (configs/stage*.py) runs on its synthetic data (real bundled speech for 2.1a)."""
    from vita_jax import config as config_lib
    from vita_jax.train import trainer
    c = config_lib.load_config(f"stage{stage}:tiny")
    assert {"total_steps", "checkpoint_every", "seed"} <= set(c.keys())
    c.total_steps, c.checkpoint_every = 2, 100
    out = trainer.train(c, str(tmp_path), log=lambda *_: None, progress=False)
    assert out["steps"] == 2 and np.isfinite(out["last"]["loss"])
    assert os.path.isdir(tmp_path / "model")


def test_torn_metrics_line_dropped_on_resume(tmp_path):
    """A kill in the middle of a metrics write leaves a torn last line: resume drops it."""
    from vita_jax.train import trainer
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    trainer._trim_metrics(str(path), 2)
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2]
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    trainer._trim_metrics(str(path), 3)  # the torn step 3 is gone even when its checkpoint exists
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2]


@pytest.mark.parametrize("field", ["checkpoint_every", "total_steps", "batch_size"])
def test_bad_run_settings_named_before_any_work(tmp_path, field):
    from vita_jax.train import stages, trainer
    c = stages.stage_config("1.1", "tiny")
    c[field] = 0
    with pytest.raises(ValueError, match=f"config.{field} = 0"):
        trainer.train(c, str(tmp_path / "wd"), log=lambda *_: None, progress=False)
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("base_dtype", ["", "int8"], ids=["lora", "qlora"])
def test_lora_resumes_bitwise_after_sigterm_and_sigkill(tmp_path, base_dtype):
    """A LoRA stage and a QLoRA one (int8 base) from the fixture release: stopped by SIGTERM (checkpointed, exit
    128 + 15), resumed, killed by SIGKILL, resumed: the losses and the run checkpoint (adapters and their optimizer
    state) equal the run never interrupted, bitwise."""
    steps = 8
    cmd = [sys.executable, "-m", "vita_jax.cli", "train", "--config=stage2_2:tiny", f"--config.init_from={TINY}",
           f"--config.total_steps={steps}", "--config.checkpoint_every=2", "--no-progress", "--config.lora.rank=4",
           "--config.lora.alpha=8"] + ([f"--config.lora.base_dtype={base_dtype}"] if base_dtype else [])
    _run(tmp_path / "ref", cmd=cmd)
    run = tmp_path / "run"
    rc, out = _run(run, kill_at=2, cmd=cmd, sig=signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM and "vita-jax: stopped by SIGTERM after step " in out, out[-3000:]
    _run(run, kill_at=5, cmd=cmd)  # SIGKILL
    _, out = _run(run, cmd=cmd)
    assert "resumed from step " in out, out[-3000:]
    assert _losses(run, steps) == _losses(tmp_path / "ref", steps)  # bitwise
    want, got = _final(tmp_path / "ref", steps), _final(run, steps)
    assert any("lora" in k for k in want) and not any(k.endswith("'kernel']") for k in want), list(want)[:8]
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
