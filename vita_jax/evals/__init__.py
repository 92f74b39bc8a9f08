"""Evaluators: the benchmarks VITA-1.5 reports (LibriSpeech WER, MME, MMBench, Video-MME, ...) as
tasks chosen by name, scored as their public evaluation code scores them, run in batches on the
device (:mod:`vita_jax.evals.engine`), from ``vita-jax eval`` and during training
(``config.evals``, :mod:`vita_jax.evals.training`)."""
from vita_jax.evals.engine import EvalEngine
from vita_jax.evals.runner import evaluate, log_line, settings_of, suite, write_outputs
from vita_jax.evals.tasks import TASKS

__all__ = ["EvalEngine", "TASKS", "evaluate", "log_line", "settings_of", "suite", "write_outputs"]
