"""Preemption: SIGTERM (a preemptible VM's or Colab's notice, ``kill``, a scheduler) and SIGINT (Ctrl-C) during
training finish the step in flight, save a checkpoint of it and stop with :class:`Preempted` (one line naming
the signal, the step and the checkpoint); rerunning the same command resumes from that step exactly.

:class:`StopOnSignal` owns the two handlers while the loop runs and puts the previous ones back when it ends
(``train()`` is also a library function: the caller's handlers, pytest's and the demo's, are restored). A second
signal of either kind goes to the previous handler at once (Ctrl-C twice: ``KeyboardInterrupt``; SIGTERM twice:
the default, the process ends): a way out when the step itself hangs.

Several processes stop at the same step: each step's decision is the OR of every process's flag
(:func:`multihost_utils.process_allgather` of one int32), so a signal that reached only some processes (or
reached them between two steps) stops all of them after the same step. One process does no exchange at all: the
check is an attribute read. JAX's own preemption service (``multihost_utils.reached_preemption_sync_point``, what
orbax's ``CheckpointManager.reached_preemption`` and MaxText use) is not used: it exists only after
``jax.distributed.initialize``, hears SIGTERM only (not Ctrl-C) and installs its own SIGTERM handler, which a
Python handler would replace.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(BaseException):
    """A run stopped by a signal after its checkpoint was saved (a ``BaseException``, like
    ``KeyboardInterrupt``: an ``except Exception`` of the caller does not take it for a failed step).
    ``exit_code``: 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), the shell's code for a process
    that a signal ended, so that schedulers and retry loops rerun it (0 would mark the job done)."""

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message)
        self.signum, self.step, self.exit_code = signum, step, 128 + int(signum)


class StopOnSignal:
    """``with StopOnSignal() as stop: ... if stop.requested(): ...``. Outside the main thread (where Python
    cannot install handlers) it installs nothing and never asks to stop."""

    def __init__(self, signals=SIGNALS):
        self.signals, self.signum, self.previous = tuple(signals), None, {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        for s, prev in self.previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self.previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum  # the loop stops after the step in flight
            return
        prev = self.previous.get(signum, signal.SIG_DFL)
        self.restore()  # a second signal: what the caller's handler (or the default) does
        if callable(prev):
            prev(signum, frame)
        elif prev == signal.SIG_DFL:
            signal.raise_signal(signum)

    def requested(self) -> bool:
        """Whether to stop now; with several processes the same answer on each (one tiny all-gather per call)."""
        if jax.process_count() == 1:
            return self.signum is not None
        flags = multihost_utils.process_allgather(np.int32(self.signum or 0))
        got = int(np.max(flags))
        if got and self.signum is None:
            self.signum = got  # another process's signal: named in this process's message too
        return bool(got)

    def name(self) -> Optional[str]:
        return signal.Signals(self.signum).name if self.signum else None
