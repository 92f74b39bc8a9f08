"""Evaluators during training, big_vision style: ``config.evals = {NAME: dict(type=..., data=...,
every=N, max_examples=..., batch_size=..., max_new_tokens=...)}``. The trainer calls
:meth:`TrainingEvals.run` after each step; an evaluator runs when its ``every`` divides the step
and at the last step, on every process (each prepares its share of every batch; the predictions
are gathered, so the metrics equal one process's). Process 0 appends one line
``{"step", "eval/NAME/METRIC": ...}`` per evaluator to ``metrics.jsonl``, the same scalars to
TensorBoard, and the predictions to ``WORKDIR/evals/STEP/NAME.jsonl``.
"""
from __future__ import annotations

import json
import math
from typing import Callable, Optional

import jax

from vita_jax import paths
from vita_jax.data.text import load_tokenizer
from vita_jax.evals import runner
from vita_jax.evals.engine import EvalEngine
from vita_jax.models.vita import VITA


class TrainingEvals:
    """The run's evaluators (``config.evals``), checked when the run starts."""

    def __init__(self, config, workdir: str, mesh=None, log: Callable = print):
        self.suite = runner.suite(config)
        for name, s in self.suite.items():  # every evaluator's data checked (then let go) before training starts
            runner.read_data(s, name)
        self.workdir, self.mesh, self.log, self.config = workdir, mesh, log, config
        self.tokenizer = None
        if self.suite:
            tok_dir = config.data.get("tokenizer") or config.get("init_from") or None
            self.tokenizer = load_tokenizer(tok_dir) if tok_dir else None
            if self.tokenizer is None:
                raise ValueError("config.evals needs a tokenizer: set config.data.tokenizer (or init_from)")
            self.module = VITA.from_config(config)

    def __bool__(self) -> bool:
        return bool(self.suite)

    def due(self, step: int, total: int) -> list:
        return [n for n, s in self.suite.items() if runner.step_due(s, step, total)]

    def run(self, step: int, total: int, params_fn: Callable[[], dict], metrics_file=None, tb=None) -> Optional[dict]:
        """Runs the evaluators due at ``step`` on ``params_fn()`` (the whole-model tree); returns
        ``{NAME: metrics}`` (None when none is due)."""
        names = self.due(step, total)
        if not names:
            return None
        engine = EvalEngine(self.module, params_fn(), self.config, self.tokenizer, self.mesh)
        main = jax.process_index() == 0
        out = {}
        for name in names:
            metrics, records = runner.evaluate(engine, self.suite[name], name,
                                               data=runner.read_data(self.suite[name], name, check=False))
            out[name] = metrics
            line = {"step": step, **{f"eval/{name}/{k}": (None if isinstance(v, float) and math.isnan(v) else v)
                                     for k, v in metrics.items()}}
            if not main:
                continue
            if metrics_file is not None:
                metrics_file.write(json.dumps(line) + "\n")
                metrics_file.flush()
            if tb is not None:
                for k, v in metrics.items():
                    if isinstance(v, (int, float)) and not math.isnan(v):
                        tb.add_scalar(f"eval/{name}/{k}", v, step)
            folder = paths.join(self.workdir, "evals", str(step))
            paths.makedirs(folder)
            runner.write_predictions(paths.join(folder, f"{name}.jsonl"), records, opener=paths.open)
            self.log(f"step {step}: eval {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                                if isinstance(v, (int, float))))
        return out
