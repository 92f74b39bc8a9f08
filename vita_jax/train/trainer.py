"""The training loop. It asks ``data/`` for batches (official files, or the tiny configs' synthetic
sets), ``models/`` for the initial parameters and heads, ``train/setup`` for the state and the
jitted step, ``train/checkpoint`` for checkpoints, and runs: step, metrics, checkpoint, resume.

Every logged step is appended to ``WORKDIR/metrics.jsonl``; checkpoints live in ``WORKDIR/ckpt``.
WORKDIR may be a URL (``gs://bucket/run``): every file goes through :mod:`vita_jax.paths`.
Re-running on the same work dir resumes from the newest complete checkpoint (state, data-iterator
position) and drops metric lines past it, so an interrupted run continues exactly where it was.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from vita_jax import config as config_lib
from vita_jax import paths
from vita_jax.convert import checkpoint, orbax_io, target
from vita_jax.convert import tts as tts_io
from vita_jax.data import pipeline, synthetic
from vita_jax.data import settings as data_settings
from vita_jax.data.text import load_tokenizer
from vita_jax.evals.training import TrainingEvals
from vita_jax.models import vita
from vita_jax.train import checkpoint as ckpt_lib
from vita_jax.train import codec_loop, codec_setup, flops, setup, stages, tensorboard


def initial_params(config, ck: Optional[checkpoint.Checkpoint] = None) -> dict:
    """``config.init_from`` (a release directory or vita_jax checkpoint, parameters only; ``ck`` if
    already opened) or a random model; plus the stage's extra heads (CTC head, speech decoder)."""
    if config.init_from:
        ck = ck or checkpoint.load(config.init_from)
        params = dict(ck.params)
        want = jax.eval_shape(lambda: vita.init_params(config, seed=0))
        for path, leaf in jax.tree_util.tree_leaves_with_path(want):
            node = params
            for k in path:
                node = node.get(k.key) if hasattr(node, "get") else None
            if node is not None and tuple(node.shape) != tuple(leaf.shape):
                raise ValueError(f"config.init_from = {config.init_from}: {jax.tree_util.keystr(path)} has shape "
                                 f"{tuple(node.shape)}, the config's model wants {tuple(leaf.shape)} (another model size?)")
        if config.loss == "tts" and ck.tts is not None:
            params["tts_decoder"] = ck.tts[1]
    else:
        params = vita.init_params(config, seed=int(config.seed))
    return vita.init_heads(config, params, seed=int(config.seed))


def export_model(config, state, path: str) -> None:
    """The stage's final parameters as a vita_jax checkpoint (the model parts; a trained speech
    decoder also goes to ``path/vita_tts_ckpt`` in the official format)."""
    params = stages.merge(state.train, state.frozen)
    pdt = jnp.dtype(config.param_dtype)
    model_params = {k: jax.tree.map(lambda x: x.astype(pdt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params[k])
                    for k in vita.parts(config) if k in params}
    extra = None
    if "tts_decoder" in params:
        tts = params["tts_decoder"]
        if jax.process_count() > 1:  # the official .pt is written by one process from host copies
            tts = multihost_utils.process_allgather(tts, tiled=True)
        tc = vita.tts_config(config)
        extra = lambda tmp: tts_io.write(os.path.join(tmp, "vita_tts_ckpt"), tc, tts)  # noqa: E731
    orbax_io.save(path, config, model_params, write_extra=extra, overwrite=True)


def next_batch(data, accum: int) -> dict:
    """One step's host batch: ``accum`` micro-batches stacked leaf by leaf on a leading axis (none
    when 1), lists of clip groups included (:func:`~vita_jax.data.pipeline.stack_micro_batches`)."""
    if accum == 1:
        return next(data)
    return pipeline.stack_micro_batches([next(data) for _ in range(accum)])


def _batch_size(config, host: dict, accum: int):
    """``(rows, length, tiles, audio frames)`` of the global step for the FLOPs count (LM stages; else None)."""
    if config.loss != "lm" or "kind" not in host:
        return None
    b, L = np.shape(host["kind"])[-2:]
    copies = accum * jax.process_count()  # this process holds 1/copies of the step's rows
    return (b * copies, L, int(np.shape(host["pixels"])[-4]) * copies,
            sum(int(np.asarray(n).sum()) for n in jax.tree.leaves(host["audio_lens"])) * jax.process_count())


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
    for field in ("dtype", "param_dtype", "frozen_dtype"):
        if config.get(field) is not None and str(config[field]) not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"config.{field} = {config[field]!r}: must be float32, bfloat16 or float16")
    for pattern, lr in (config.get("optim") or {}).get("group_lrs", None) or ():
        if not 0 <= float(lr) < float("inf"):
            raise ValueError(f"config.optim.group_lrs: learning rate {lr!r} of {pattern!r} must be a finite number >= 0")


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


def _complete(config, model_dir: str) -> bool:
    """Whether the stage's ``WORKDIR/model`` export is finished."""
    if config.get("loss") == "codec":
        return paths.is_local(model_dir) and codec_loop.export_complete(model_dir)
    return orbax_io.is_complete(model_dir)


def _no_tokens_before(path: Optional[str], start: int) -> bool:
    """Whether steps 1..``start`` (all in ``metrics.jsonl``) trained on no target token (process 0 reads
    the file; a history with lines missing counts as trained)."""
    rows = _rows(path) if start and path is not None else []
    empty = not start or (len({r["step"] for r in rows}) == start and not sum(r.get("tokens", 1) for r in rows))
    if jax.process_count() > 1:
        empty = bool(multihost_utils.broadcast_one_to_all(np.int32(empty)))
    return empty


def _check_vocab(config, tok) -> None:  # ids past the model's vocabulary train to NaN
    if tok is not None and len(tok) > int(config.llm.vocab_size):
        name = f"config.data.tokenizer = {config.data.tokenizer}" if config.data.tokenizer else \
            f"the tokenizer of config.init_from = {config.init_from}"
        raise ValueError(f"{name} has {len(tok)} tokens, more than config.llm.vocab_size = {config.llm.vocab_size} "
                         "(ids past the model's vocabulary train to NaN): use the model's tokenizer or a larger vocab_size")


def _build(config, data, mesh, wrap_step, log, evals=None, ck=None, done: int = 0):
    """``(state, step_fn, info, data)``: the stage's initial state, jitted step and data (the synthetic set
    unless files or ``data`` are given). Checked first: data files, tokenizer size, the checkpoint's run."""
    if config.get("loss") == "codec":  # stage 3.1: its own data, state and step
        if done:
            ck.check_same_run(done, config)
        state, step_fn, info, codec_batches = codec_setup.build(config, mesh, log)
        log(f"stage {config.stage}: {config.description}\n{info['table']}")
        return state, (wrap_step(step_fn) if wrap_step else step_fn), info, data or codec_batches
    has_files, given = bool(len(config.data.mixture) or len(config.data.tfds)), data is not None
    if data is None and not has_files:
        data, units = synthetic.synthetic_data(config)
        if units is not None:  # the CTC head is sized by the unit vocabulary of the synthetic clips
            config.ctc_units = units
    tok_dir = config.data.tokenizer or config.init_from or None
    _check_vocab(config, evals.tokenizer if evals else None)
    if data is None:  # the data files are opened and checked (shape, samples) before any model is built
        tok = load_tokenizer(tok_dir) if tok_dir else None
        if tok is None:
            raise ValueError("config.data.mixture / config.data.tfds need a tokenizer: set config.data.tokenizer (or "
                             f"init_from){f'; {tok_dir} has no tokenizer.json' if tok_dir else ''}")
        data = pipeline.official_data(config, tok)
        _check_vocab(config, tok)
    if given and not evals and config.data.tokenizer:  # the caller's batches were made with it
        _check_vocab(config, load_tokenizer(config.data.tokenizer))
    if done:  # a checkpoint of another model or stage is refused before the model is built
        ck.check_same_run(done, config)
    ck_in = checkpoint.load(config.init_from) if config.init_from else None
    params = initial_params(config, ck_in)
    state, step_fn, info = setup.build(config, params, mesh=mesh)
    if wrap_step is not None:
        step_fn = wrap_step(step_fn)
    del params, ck_in
    log(f"stage {config.stage}: {config.description}\n{info['table']}")
    log(f"processes: {jax.process_count()}, devices: {jax.device_count()} ({jax.local_device_count()} local), "
        f"mesh: {dict(mesh.shape) if mesh is not None else 'none'}")
    return state, step_fn, info, data


def train(config, workdir: str, mesh=None, data=None, log: Callable = print, progress: bool = True,
          stop_after: Optional[int] = None, wrap_step: Optional[Callable] = None, return_state: bool = True) -> dict:
    """Runs (or resumes) ``config``'s stage in ``workdir``. ``data``: an iterator of host batches
    with ``get_state``/``set_state`` (default: the synthetic set of the tiny configs). ``wrap_step``:
    ``step -> step`` around the jitted step (profiling, ``bench pipeline``'s deliberately slow step).

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
    if done == total and _complete(config, model_dir) and not return_state:
        ck.close()
        log(f"stage {config.stage} already finished: checkpoint {total} in {ck.path} and its model in {model_dir}; "
            "nothing to do")
        return dict(last=(_rows(metrics_path) or [{}])[-1], state=None, steps=total, skipped={})
    try:
        state, step_fn, info, data = _build(config, data, mesh, wrap_step, log, evals, ck, done)
        start = 0
        if done:
            start, state, data_state = ck.restore_latest(state, log)
            data.set_state(data_state)
            log(f"resumed from step {start}")
        if main:
            _trim_metrics(metrics_path, start)
    except BaseException:
        ck.close()
        raise
    done = start
    metrics_path = metrics_path if main else os.devnull
    accum = int(config.grad_accum)
    bar = None
    if progress:
        bar = tqdm(total=total, initial=start, desc=f"stage {config.stage}", leave=False)
    tb = tensorboard.writer(workdir)
    peak = flops.device_peaks(jax.devices()[0].device_kind)[0]
    place = info["place"]
    evals = info.get("evals") or evals  # stage 3.1: its held-out mel measure
    params_of = info.get("params_of") or (lambda s: stages.merge(s.train, s.frozen))

    def produce():
        """One step's input, made ahead in the pipeline's thread: placed batch, data state after it, its size."""
        host = next_batch(data, accum)
        return place(host), data.get_state(), _batch_size(config, host, accum)

    # the next batches are made and placed while the device runs; a step's metrics are read once the next
    # step is dispatched, so neither the host pipeline nor the metrics read stalls the device
    feed = pipeline.Prefetch(produce, depth=int(config.data.get("prefetch", 2)))
    last, pending, t0 = ((_rows(metrics_path) or [{}])[-1] if start == total else {}), None, time.perf_counter()
    seen = 0  # target tokens trained on in this call (a run shorter than max_empty_steps can still train on nothing)
    t_done, empty = t0, 0

    def record(p) -> None:
        """Reads the metrics of a dispatched step (blocks until it is done), logs them, stops on non-finite runs."""
        nonlocal last, t_done, empty, seen
        i, met, size, wait = p
        met = {k: float(v) for k, v in jax.device_get(met).items()}
        now = time.perf_counter()
        dt, t_done = now - t_done, now  # step period: between consecutive completions
        met.update(step=i + 1, seconds=now - t0, step_s=dt, data_wait_s=wait, tokens_per_s=met["tokens"] / dt)
        if size is not None:
            fl = flops.step_flops(config, *size)
            met["tflops_per_s"] = fl / dt / 1e12
            if peak:
                met["mfu"] = fl / dt / (peak * jax.device_count())
        if tb is not None:
            for k, v in met.items():
                if k not in ("step", "finite"):
                    tb.add_scalar(f"train/{k}", v, i + 1)
        mf.write(json.dumps(met) + "\n")
        mf.flush()
        last = met
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{met['loss']:.4f}")
        if met["finite"] and not met["tokens"]:
            log(f"step {i + 1}: no target tokens in the batch (every sample skipped), update skipped")
        empty, seen = (0 if met["tokens"] else empty + 1), seen + met["tokens"]
        if empty >= int(config.get("max_empty_steps", 20)):
            raise ValueError(f"{empty} steps in a row had no target tokens (every sample bad or unlabelled); "
                             f"stopping: check the data ({_data_names(config)}; config.max_empty_steps)")
        if not met["finite"]:
            log(f"step {i + 1}: non-finite loss or gradient, update skipped")
            if int(met["nonfinite"]) >= int(config.max_nonfinite_steps):
                raise FloatingPointError(f"{int(met['nonfinite'])} non-finite steps in a row; stopping")

    try:
        with paths.appender(metrics_path) as mf:
            if start == 0 and getattr(evals, "at_start", False):  # stage 3.1's held-out mel of the untrained codec
                evals.run(0, total, lambda: params_of(state), mf, tb)
            for i in range(start, total):
                (batch, data_state, size), wait = feed.next()
                state, met = step_fn(state, batch)  # dispatched: runs while the previous step's metrics are read
                if pending is not None:
                    record(pending)
                pending = (i, met, size, wait)
                if (i + 1) % ck.every == 0 or i + 1 == total:  # a checkpoint never gets ahead of its metrics line
                    record(pending)
                    pending = None
                ck.save(i + 1, state, data_state, config, force=(i + 1 == total))
                done = i + 1
                if evals and evals.due(i + 1, total):  # after the step's own metrics line
                    pending = record(pending) if pending is not None else None
                    evals.run(i + 1, total, lambda: params_of(state), mf, tb)
                if stop_after is not None and i + 1 >= stop_after:
                    break
            if pending is not None:
                record(pending)
    except BaseException:  # the checkpoint manager's threads end before the error is reported
        ck.close()
        raise
    finally:
        feed.close()
    if bar is not None:
        bar.close()
    if tb is not None:
        tb.close()
    ck.close()
    if done == total and not seen and _no_tokens_before(metrics_path if main else None, start):
        raise ValueError(f"the whole run had no target tokens (every sample bad, too long or unlabelled): no model "
                         f"written; check the data ({_data_names(config)})")
    if start == total and not _complete(config, model_dir):
        log(f"stage {config.stage} had finished (checkpoint {total} in {ck.path}) but {model_dir} is missing or "
            "incomplete (an interrupted export): writing it from that checkpoint")
    if done == total and (start < total or not _complete(config, model_dir)):
        if "export" in info:
            info["export"](state, model_dir)
        else:
            export_model(config, state, model_dir)
        log(f"final parameters written to {model_dir} (use it as the next stage's init_from)")
    skipped = dict(getattr(data, "skipped", None) or getattr(getattr(data, "collator", None), "skipped", {}) or {})
    if skipped:
        log(f"skipped {len(skipped)} bad sample(s): " + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())))
    return dict(last=last, state=state, steps=last.get("step", start), skipped=skipped)
