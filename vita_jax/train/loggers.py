"""Where a run's scalars go besides ``metrics.jsonl``: TensorBoard (:mod:`vita_jax.train.tensorboard`) and, with
``config.wandb = dict(project=..., name=..., mode=...)``, Weights & Biases (the optional extra ``wandb``). W&B
gets every scalar TensorBoard gets, under the same names (``train/loss``, ``eval/NAME/...``, ``heldout/...``),
against the run's step (a ``step`` column: a resumed run re-logs the steps past its checkpoint instead of
having them dropped as out of order). The W&B run's id is kept in ``WORKDIR/wandb_run_id``: a rerun on the
same work dir continues the same W&B run (``resume="allow"``). Only process 0 logs."""
from __future__ import annotations

import importlib.util
import json
import uuid

import jax

from vita_jax import paths
from vita_jax.train import tensorboard

# config.wandb's keys, passed to wandb.init as they are
WANDB_KEYS = ("project", "name", "mode", "entity", "group", "tags", "notes")
WANDB_MODES = ("online", "offline", "disabled")
RUN_ID_FILE = "wandb_run_id"


def wandb_settings(config) -> dict:
    """``config.wandb`` as a dict (empty: no W&B), checked: a ``ValueError`` naming the field, or an
    ``ImportError`` in one line when it is set but wandb is not installed."""
    raw = config.get("wandb") or {}
    c = raw.to_dict() if hasattr(raw, "to_dict") else raw
    if not isinstance(c, dict):
        raise ValueError(f"config.wandb = {raw!r}: must be a dict (project=..., name=..., mode=...) or empty")
    c = {k: v for k, v in c.items() if v not in (None, "")}
    unknown = sorted(set(c) - set(WANDB_KEYS))
    if unknown:
        raise ValueError(f"config.wandb: unknown key(s) {', '.join(unknown)} (known: {', '.join(WANDB_KEYS)})")
    if "mode" in c and c["mode"] not in WANDB_MODES:
        raise ValueError(f"config.wandb.mode = {c['mode']!r}: must be one of {', '.join(WANDB_MODES)}")
    if c and importlib.util.find_spec("wandb") is None:
        raise ImportError("config.wandb is set but wandb is not installed: pip install 'vita_jax[wandb]' "
                          "(or leave config.wandb empty)")
    return c


class Wandb:
    """A W&B run with TensorBoard's ``add_scalar`` / ``close``: a step's scalars go out together as one row."""

    def __init__(self, settings: dict, workdir: str, config):
        import wandb  # optional extra (config.wandb): imported only when a run asks for it
        self.wandb, self.step, self.row = wandb, None, {}
        id_path = paths.join(workdir, RUN_ID_FILE)
        if paths.exists(id_path):
            with paths.open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]  # W&B's own ids are 8 of [a-z0-9]
            with paths.open(id_path, "w") as f:
                f.write(run_id + "\n")
        kw = dict(dir=workdir) if paths.is_local(workdir) else {}
        self.run = wandb.init(id=run_id, resume="allow", config=json.loads(config.to_json()), **kw, **settings)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def add_scalar(self, tag: str, value, step: int) -> None:
        if self.step is not None and step != self.step:
            self.flush()
        self.step = step
        self.row[tag] = float(value)

    def flush(self) -> None:
        if self.row:
            self.run.log(dict(self.row, step=self.step))
        self.row = {}

    def close(self) -> None:
        self.flush()
        self.run.finish()


class Fanout:
    """``add_scalar`` / ``close`` to each of several writers."""

    def __init__(self, writers):
        self.writers = list(writers)

    def add_scalar(self, *args, **kwargs) -> None:
        for w in self.writers:
            w.add_scalar(*args, **kwargs)

    def close(self) -> None:
        for w in self.writers:
            w.close()


def writer(config, workdir: str):
    """The run's scalar writer on process 0: TensorBoard, plus W&B when ``config.wandb`` is set (None elsewhere
    or when there is neither)."""
    if jax.process_index() != 0:
        return None
    settings, tb = wandb_settings(config), tensorboard.writer(workdir)
    try:
        writers = [w for w in (tb, Wandb(settings, workdir, config) if settings else None) if w is not None]
    except BaseException:  # wandb.init failed (no login for an online run, ...): TensorBoard's file is closed
        if tb is not None:
            tb.close()
        raise
    return Fanout(writers) if len(writers) > 1 else (writers[0] if writers else None)
