"""The training loop. It asks :mod:`vita_jax.train.program` for the stage's program (state, jitted step,
placement, data, evaluator, export: the same contract for every stage), ``train/run_checkpoint`` for
checkpoints, and runs: step, metrics, checkpoint, resume, export. It never branches on the stage.

Every logged step is appended to ``WORKDIR/metrics.jsonl``; checkpoints live in ``WORKDIR/ckpt``.
WORKDIR may be a URL (``gs://bucket/run``): every file goes through :mod:`vita_jax.paths`.
Re-running on the same work dir resumes from the newest complete checkpoint (state, data-iterator
position) and drops metric lines past it, so an interrupted run continues exactly where it was. SIGTERM and
SIGINT stop the loop after the step in flight, checkpointed (:mod:`vita_jax.train.preemption`); scalars go to
TensorBoard and W&B (:mod:`vita_jax.train.loggers`); ``config.profile_steps`` traces a window of steps
(:mod:`vita_jax.train.profiling`).
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from vita_jax import config as config_lib
from vita_jax import paths
from vita_jax.convert import target
from vita_jax.data import pipeline
from vita_jax.data import settings as data_settings
from vita_jax.evals.training import TrainingEvals
from vita_jax.train import flops, loggers, preemption, profiling, program
from vita_jax.train import run_checkpoint as ckpt_lib


def next_batch(data, accum: int) -> dict:
    """One step's host batch: ``accum`` micro-batches stacked leaf by leaf on a leading axis (none
    when 1), lists of clip groups included (:func:`~vita_jax.data.pipeline.stack_micro_batches`)."""
    if accum == 1:
        return next(data)
    return pipeline.stack_micro_batches([next(data) for _ in range(accum)])


def _step_of(line: str) -> Optional[int]:
    """The step of one metrics line; None for a torn line (a kill mid-write) or a foreign one."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _data_names(config) -> str:
    files = [str(f.get("json", f)) if hasattr(f, "get") else str(f) for f in config.data.mixture]
    files += [str(f.get("data_dir") or f.get("name", f)) if hasattr(f, "get") else str(f) for f in config.data.tfds]
    return ", ".join(files) or "the synthetic data"


def _trim_metrics(path: str, last_step: int) -> None:
    """Keeps the lines up to the checkpoint being resumed from; a torn or unreadable line is dropped."""
    if not paths.exists(path):
        return
    with paths.open(path) as f:
        steps = [(line, _step_of(line)) for line in f]
    keep = [line if line.endswith("\n") else line + "\n" for line, step in steps
            if step is not None and step <= last_step]
    with paths.open(path, "w") as f:
        f.writelines(keep)


# (field, test, what it must be): the run settings checked before anything is built
RUN_SETTINGS = [(f, lambda v: v >= 1, "at least 1") for f in ("total_steps", "checkpoint_every", "keep_checkpoints",
                                                              "batch_size", "grad_accum", "max_nonfinite_steps",
                                                              "max_empty_steps", "data.seq_len",
                                                              "tokenizer_model_max_length")] + [
    ("data.prefetch", lambda v: v >= 0, "at least 0"), ("data.workers", lambda v: v >= 0, "at least 0"),
    ("optim.lr", lambda v: 0 <= v < float("inf"), "a finite number >= 0"),
    ("optim.grad_clip", lambda v: 0 < v < float("inf"), "a finite number > 0"),
    ("optim.warmup_ratio", lambda v: 0 <= v <= 1, "between 0 and 1"),
    ("optim.weight_decay", lambda v: 0 <= v < float("inf"), "a finite number >= 0"),
    ("optim.b1", lambda v: 0 <= v < 1, "in [0, 1)"), ("optim.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.eps", lambda v: 0 < v < float("inf"), "a finite number > 0"),
    ("optim.schedule", lambda v: v in ("cosine", "constant"), "'cosine' or 'constant'")]


def check_config(config) -> None:
    """Cheap checks of the run's settings, before any model is built (one line naming the field)."""
    for field, ok, what in RUN_SETTINGS:
        node, *rest = field.split(".")
        value = config.get(node)
        for k in rest:
            value = value.get(k) if value is not None else None
        if value is None:
            continue  # a config without the field (an older stage config) keeps the default behaviour
        try:
            good = bool(ok(value))
        except TypeError:
            good = False
        if not good:
            raise ValueError(f"config.{field} = {value!r}: must be {what}")
    data_settings.check(config)  # every config.data field the data path reads: type, range, allowed values
    config_lib.check_model(config)
    profiling.parse(config.get("profile_steps"))  # "FIRST:LAST" or empty
    loggers.wandb_settings(config)  # config.wandb's keys, and wandb installed when it is set
    for field in ("dtype", "param_dtype", "frozen_dtype"):
        if config.get(field) is not None and str(config[field]) not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"config.{field} = {config[field]!r}: must be float32, bfloat16 or float16")
    for pattern, lr in (config.get("optim") or {}).get("group_lrs", None) or ():
        if not 0 <= float(lr) < float("inf"):
            raise ValueError(f"config.optim.group_lrs: learning rate {lr!r} of {pattern!r} "
                             "must be a finite number >= 0")


def _open_checkpoints(config, workdir: str, log: Optional[Callable]) -> ckpt_lib.Checkpointer:
    """``WORKDIR/ckpt``'s checkpointer, after saying which leftovers of a killed run are removed (orbax's
    unfinished saves, the model export's temporary folder); refuses a newest step past ``total_steps``."""
    ck = ckpt_lib.Checkpointer(paths.join(workdir, "ckpt"), keep=int(config.keep_checkpoints),
                               every=int(config.checkpoint_every), clean=True)
    if log is not None:
        if ck.leftovers:
            log(f"{ck.path}: removing {', '.join(ck.leftovers)}, left by an interrupted checkpoint save")
        target.clean_leftovers(paths.join(workdir, "model"), log)
    latest = ck.latest_step() or 0
    if latest > int(config.total_steps):
        ck.close()
        raise ValueError(f"config.total_steps = {config.total_steps}, but {ck.path} already holds step {latest}: "
                         "raise total_steps to continue that run, or use another --workdir")
    return ck


def _rows(path: str) -> list:
    """The complete lines of ``metrics.jsonl`` (none when it is missing)."""
    if not paths.exists(path):
        return []
    with paths.open(path) as f:
        return [json.loads(line) for line in f if _step_of(line) is not None]


def _no_tokens_before(path: Optional[str], start: int) -> bool:
    """Whether steps 1..``start`` (all in ``metrics.jsonl``) trained on no target token (process 0 reads
    the file; a history with lines missing counts as trained)."""
    rows = _rows(path) if start and path is not None else []
    empty = not start or (len({r["step"] for r in rows}) == start and not sum(r.get("tokens", 1) for r in rows))
    if jax.process_count() > 1:
        empty = bool(multihost_utils.broadcast_one_to_all(np.int32(empty)))
    return empty




class Recorder:
    """Reads a dispatched step's metrics (blocking until the step is done), adds timings, FLOPs and MFU,
    writes them to ``metrics.jsonl`` / TensorBoard / the progress bar, and stops runs that went wrong:
    ``max_nonfinite_steps`` non-finite steps or ``max_empty_steps`` steps without a target token in a row."""

    def __init__(self, config, out, tb, bar, log):
        self.config, self.out, self.tb, self.bar, self.log = config, out, tb, bar, log
        self.peak = flops.device_peaks(jax.devices()[0].device_kind)[0]
        self.t0 = self.t_done = time.perf_counter()
        self.last, self.empty = {}, 0
        self.seen = 0  # target tokens trained on in this call (a run shorter than max_empty_steps can train on none)

    def __call__(self, pending) -> None:
        i, met, size, wait = pending
        met = {k: float(v) for k, v in jax.device_get(met).items()}
        now = time.perf_counter()
        dt, self.t_done = now - self.t_done, now  # step period: between consecutive completions
        met.update(step=i + 1, seconds=now - self.t0, step_s=dt, data_wait_s=wait, tokens_per_s=met["tokens"] / dt)
        if size is not None:
            fl = flops.step_flops(self.config, *size)
            met["tflops_per_s"] = fl / dt / 1e12
            if self.peak:
                met["mfu"] = fl / dt / (self.peak * jax.device_count())
        self._write(met)
        self._check(met)

    def _write(self, met: dict) -> None:
        if self.tb is not None:
            for k, v in met.items():
                if k not in ("step", "finite"):
                    self.tb.add_scalar(f"train/{k}", v, met["step"])
        self.out.write(json.dumps(met) + "\n")
        self.out.flush()
        self.last = met
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{met['loss']:.4f}")

    def _check(self, met: dict) -> None:
        step, c = met["step"], self.config
        if met["finite"] and not met["tokens"]:
            self.log(f"step {step}: no target tokens in the batch (every sample skipped), update skipped")
        self.empty, self.seen = (0 if met["tokens"] else self.empty + 1), self.seen + met["tokens"]
        if self.empty >= int(c.get("max_empty_steps", 20)):
            raise ValueError(f"{self.empty} steps in a row had no target tokens (every sample bad or unlabelled); "
                             f"stopping: check the data ({_data_names(c)}; config.max_empty_steps)")
        if not met["finite"]:
            self.log(f"step {step}: non-finite loss or gradient, update skipped")
            if int(met["nonfinite"]) >= int(c.max_nonfinite_steps):
                raise FloatingPointError(f"{int(met['nonfinite'])} non-finite steps in a row; stopping")


def _start(config, data, mesh, wrap_step, log, evals, ck, done: int, metrics_path: Optional[str]):
    """``(program, start step)``: the stage's program, restored from the newest checkpoint when there is one
    (the metrics past it dropped by process 0)."""
    try:
        prog = program.build(config, data, mesh, log, evals, ck, done)
        if wrap_step is not None:
            prog.step = wrap_step(prog.step)
        log(f"stage {config.stage}: {config.description}\n{prog.table}")
        start = 0
        if done:
            # without a mesh the state comes back uncommitted, as a fresh one: the same programs, cached
            start, saved, data_state = ck.restore_latest(prog.to_checkpoint(prog.state), log,
                                                         uncommitted=prog.shardings is None)
            prog.state = prog.from_checkpoint(saved, prog.state)
            prog.data.set_state(data_state)
            log(f"resumed from step {start}")
        if metrics_path is not None:
            _trim_metrics(metrics_path, start)
    except BaseException:
        ck.close()
        raise
    return prog, start


def _loop(config, prog, ck, evals, rec: Recorder, start: int, stop_after: Optional[int],
          stop: preemption.StopOnSignal, prof: profiling.Window) -> int:
    """Steps ``start`` .. ``total_steps`` (or ``stop_after``); returns the last step done. The next batches
    are made and placed while the device runs, and a step's metrics are read once the next step is
    dispatched, so neither the host pipeline nor the metrics read stalls the device. A signal (``stop``)
    ends the loop after the step in flight, saved, with :class:`~vita_jax.train.preemption.Preempted`."""
    total, accum, done = int(config.total_steps), int(config.grad_accum), start

    def produce():
        host = next_batch(prog.data, accum)
        return prog.place(host), prog.data.get_state(), prog.step_size(host)
    feed = pipeline.Prefetch(produce, depth=int(config.data.get("prefetch", 2)))
    pending = None
    try:
        if start == 0 and getattr(evals, "at_start", False):  # stage 3.1's held-out mel of the untrained codec
            evals.run(0, total, lambda: prog.params_of(prog.state), rec.out, rec.tb)
        for i in range(start, total):
            prof.before(i + 1)
            (batch, data_state, size), wait = feed.next()
            prog.state, met = prog.step(prog.state, batch)  # dispatched: runs while the last metrics are read
            if pending is not None:
                rec(pending)
            pending = (i, met, size, wait)
            if (i + 1) % ck.every == 0 or i + 1 == total:  # a checkpoint never gets ahead of its metrics line
                rec(pending)
                pending = None
            saved = ck.save(i + 1, prog.to_checkpoint(prog.state), data_state, config, force=(i + 1 == total))
            done = i + 1
            prof.after(i + 1, prog.state)
            if evals and evals.due(i + 1, total) and pending is not None:  # after the step's own metrics line
                rec(pending)
                pending = None
            if evals and evals.due(i + 1, total):
                evals.run(i + 1, total, lambda: prog.params_of(prog.state), rec.out, rec.tb)
            if stop_after is not None and i + 1 >= stop_after:
                break
            if i + 1 < total and stop.requested():  # every process answers the same
                if pending is not None:
                    rec(pending)  # the checkpoint never gets ahead of its metrics line
                    pending = None
                if not saved:
                    ck.save(i + 1, prog.to_checkpoint(prog.state), data_state, config, force=True)
                raise preemption.Preempted(f"stopped by {stop.name()} after step {i + 1}: checkpoint {i + 1} saved "
                                           f"in {ck.path}; rerun the same command to resume", stop.signum, i + 1)
        if pending is not None:
            rec(pending)
    finally:
        feed.close()
        prof.close()
    return done


def _finish(config, prog, log, model_dir: str, metrics_path: Optional[str], ck, start: int, done: int, seen) -> None:
    """After the loop: refuses a run that never trained on a target token, else exports the model when the
    run is complete (also when an earlier export was interrupted)."""
    total = int(config.total_steps)
    if done == total and not seen and _no_tokens_before(metrics_path, start):
        raise ValueError(f"the whole run had no target tokens (every sample bad, too long or unlabelled): no model "
                         f"written; check the data ({_data_names(config)})")
    complete = prog.complete(model_dir)
    if start == total and not complete:
        log(f"stage {config.stage} had finished (checkpoint {total} in {ck.path}) but {model_dir} is missing or "
            "incomplete (an interrupted export): writing it from that checkpoint")
    if done == total and (start < total or not complete):
        prog.export(prog.state, model_dir)
        log(f"final parameters written to {model_dir} (use it as the next stage's init_from)")


def train(config, workdir: str, mesh=None, data=None, log: Callable = print, progress: bool = True,
          stop_after: Optional[int] = None, wrap_step: Optional[Callable] = None, return_state: bool = True) -> dict:
    """Runs (or resumes) ``config``'s stage in ``workdir``. ``data``: an iterator of host batches
    with ``get_state``/``set_state`` (default: the stage's own: official files, or the synthetic set of
    the tiny configs). ``wrap_step``: ``step -> step`` around the jitted step (profiling, ``bench
    pipeline``'s deliberately slow step).

    A finished run (newest checkpoint at ``total_steps``) trains nothing: it writes ``WORKDIR/model``
    from that checkpoint when the model is missing or incomplete, and otherwise (with
    ``return_state=False``, as the CLI calls it) returns before building anything, with ``state`` None."""
    check_config(config)
    paths.makedirs(workdir)
    config = config.copy_and_resolve_references()  # the caller's config is never changed
    main = jax.process_index() == 0  # one process writes the metrics and logs, draws the bar
    if not main:
        log, progress = (lambda *a, **k: None), False
    evals = TrainingEvals(config, workdir, mesh, log)  # config.evals, checked before any model is built
    total = int(config.total_steps)
    model_dir, metrics_path = paths.join(workdir, "model"), paths.join(workdir, "metrics.jsonl")
    ck = _open_checkpoints(config, workdir, log if main else None)
    done = ck.latest_step() or 0
    if done == total and program.export_complete(config, model_dir) and not return_state:
        ck.close()
        log(f"stage {config.stage} already finished: checkpoint {total} in {ck.path} and its model in {model_dir}; "
            "nothing to do")
        # the last training row (a held-out row may follow it: stage 3.1 logs one after its last step)
        rows = _rows(metrics_path)
        return dict(last=next((r for r in reversed(rows) if "loss" in r), rows[-1] if rows else {}), state=None,
                    steps=total, skipped={})
    prog, start = _start(config, data, mesh, wrap_step, log, evals, ck, done, metrics_path if main else None)
    bar = tqdm(total=total, initial=start, desc=f"stage {config.stage}", leave=False) if progress else None
    tb = None
    try:  # SIGTERM / SIGINT: the step in flight is finished and saved (handlers restored on the way out)
        tb = loggers.writer(config, workdir)  # TensorBoard, and W&B with config.wandb
        with paths.appender(metrics_path if main else os.devnull) as out, preemption.StopOnSignal() as stop:
            rec = Recorder(config, out, tb, bar, log)
            rec.last = (_rows(metrics_path) or [{}])[-1] if start == total else {}
            done = _loop(config, prog, ck, prog.evals or evals, rec, start, stop_after, stop,
                         profiling.Window(config, workdir, log))
    finally:  # the checkpoint manager's threads end before an error is reported
        for closing in (bar, tb, ck):
            if closing is not None:
                closing.close()
    _finish(config, prog, log, model_dir, metrics_path if main else None, ck, start, done, rec.seen)
    skipped = dict(getattr(prog.data, "skipped", None)
                   or getattr(getattr(prog.data, "collator", None), "skipped", {}) or {})
    if skipped:
        log(f"skipped {len(skipped)} bad sample(s): " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
    return dict(last=rec.last, state=prog.state, steps=rec.last.get("step", start), skipped=skipped)
