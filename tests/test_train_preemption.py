"""Preemption: SIGTERM / SIGINT stop training after the step in flight, saved; the handlers are the caller's
again afterwards (train() is a library function too); a second signal goes to the previous handler. The CLI's
exit code and the bitwise resume: tests/test_train_trainer.py."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from vita_jax.train import preemption

from conftest import HANG_S, REPO


def test_handlers_installed_inside_and_restored_after():
    before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    with preemption.StopOnSignal() as stop:
        assert all(signal.getsignal(s) == stop._handle for s in preemption.SIGNALS)
        assert not stop.requested()
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested() and stop.name() == "SIGTERM"
    assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before


def test_second_signal_goes_to_the_previous_handler():
    seen = []
    old = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    # Python's own Ctrl-C handler before the run, whatever an earlier test of this worker left installed
    # (under xdist SIGINT's handler depends on what ran before: seen once as a failure here)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with preemption.StopOnSignal() as stop:
            signal.raise_signal(signal.SIGTERM)
            assert stop.requested() and seen == []
            signal.raise_signal(signal.SIGTERM)  # again: the caller's handler, and it stays installed
            assert seen == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is not stop._handle
        with preemption.StopOnSignal():
            signal.raise_signal(signal.SIGINT)
            with pytest.raises(KeyboardInterrupt):  # Ctrl-C twice: Python's own KeyboardInterrupt
                signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)


def test_outside_the_main_thread_nothing_is_installed():
    before, got = signal.getsignal(signal.SIGTERM), []

    def run():
        with preemption.StopOnSignal() as stop:
            got.append((signal.getsignal(signal.SIGTERM), stop.requested()))
    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert got == [(before, False)]


def test_exit_code_is_128_plus_the_signal():
    assert preemption.Preempted("m", signal.SIGTERM, 3).exit_code == 143
    assert preemption.Preempted("m", signal.SIGINT, 3).exit_code == 130
    assert not issubclass(preemption.Preempted, Exception)  # an `except Exception` does not swallow it


@pytest.mark.slow  # two tiny runs (~1 min)
@pytest.mark.parametrize("sig", [signal.SIGINT])
def test_train_stops_after_the_step_saves_it_and_restores_handlers(tmp_path, sig):
    """As a library: the signal arrives during step 2 (checkpoint_every 100): step 2 finishes, is written to
    metrics.jsonl and saved, train() raises Preempted naming it, and the caller's handlers are back; a second
    call resumes from step 2 and finishes."""
    from vita_jax.train import stages, trainer
    c = stages.stage_config("1.1", "tiny")
    c.total_steps, c.checkpoint_every = 4, 100
    calls = []

    def wrap(step):
        def sends(state, batch):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), sig)
            return step(state, batch)
        return sends
    before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    wd = str(tmp_path / "wd")
    with pytest.raises(preemption.Preempted) as e:
        trainer.train(c, wd, log=lambda *_: None, progress=False, wrap_step=wrap)
    assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before
    assert e.value.step == 2 and e.value.exit_code == 128 + sig
    assert str(e.value) == (f"stopped by {sig.name} after step 2: checkpoint 2 saved in {os.path.join(wd, 'ckpt')}; "
                            "rerun the same command to resume")
    assert max(int(n) for n in os.listdir(os.path.join(wd, "ckpt")) if n.isdigit()) == 2  # (orbax also saves step 1)
    assert [json.loads(r)["step"] for r in open(os.path.join(wd, "metrics.jsonl"))] == [1, 2]
    lines = []
    out = trainer.train(c, wd, log=lines.append, progress=False)
    assert "resumed from step 2" in lines and out["steps"] == 4
    assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before


def _process(launcher: subprocess.Popen, index: int, deadline: float) -> int:
    """The pid of process ``index`` (JAX_PROCESS_ID) among launch/local.py's children, waited for while the
    launcher runs; a launcher that already exited fails the test with its output."""
    while time.time() < deadline:
        if launcher.poll() is not None:
            raise AssertionError(f"launcher exited ({launcher.returncode}) before the signal: "
                                 + launcher.communicate()[0][-4000:])
        try:
            with open(f"/proc/{launcher.pid}/task/{launcher.pid}/children") as f:
                pids = f.read().split()
            for pid in pids:
                with open(f"/proc/{pid}/environ", "rb") as e:
                    if f"JAX_PROCESS_ID={index}".encode() in e.read().split(b"\0"):
                        return int(pid)
        except FileNotFoundError:  # a child (or the launcher) ended between the listing and the read
            pass
        time.sleep(0.05)
    raise LookupError(index)


@pytest.mark.slow  # two runs of 2 processes (~3 min)
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the launcher's children in /proc")
def test_two_processes_stop_after_the_same_step(tmp_path):
    """SIGTERM to process 1 only: both processes stop after the same step (process 0 names it, the checkpoint
    and the metrics end there); the rerun resumes from it and finishes."""
    # the first run cannot finish before the signal (a tiny step takes milliseconds; total_steps only bounds the
    # schedule), the rerun goes 2 steps past the stop (total_steps may change on resume)
    def cmd(steps):
        return [sys.executable, "launch/local.py", "--num-processes", "2", "--cpu-devices", "1", "--timeout",
                str(HANG_S), "--", sys.executable, "-m", "vita_jax.cli", "train", "--config=stage1_1:tiny",
                f"--config.total_steps={steps}", "--config.checkpoint_every=5", "--no-progress", "--workdir",
                str(tmp_path)]
    p = subprocess.Popen(cmd(100_000), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + HANG_S
    while p.poll() is None and time.time() < deadline and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.05)
    os.kill(_process(p, 1, deadline), signal.SIGTERM)
    out, _ = p.communicate(timeout=HANG_S)
    assert p.returncode == 143 and "Traceback" not in out, out[-4000:]
    said = [line for line in out.splitlines() if "vita-jax: stopped by SIGTERM after step " in line]
    assert len(said) == 1 and said[0].startswith("[p0] "), out[-4000:]
    step = int(said[0].split(" after step ")[1].split(":")[0])
    assert step >= 1
    assert max(int(n) for n in os.listdir(tmp_path / "ckpt") if n.isdigit()) == step
    assert [json.loads(r)["step"] for r in open(metrics)] == list(range(1, step + 1))
    r = subprocess.run(cmd(step + 2), cwd=REPO, capture_output=True, text=True, timeout=HANG_S + 60)
    assert r.returncode == 0 and f"[p0] resumed from step {step}" in r.stdout, r.stdout[-4000:]
    assert [json.loads(r)["step"] for r in open(metrics)] == list(range(1, step + 3))
