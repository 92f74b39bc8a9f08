"""A profile of a few training steps: ``config.profile_steps = "FIRST:LAST"`` (steps numbered as in
``metrics.jsonl``, from 1, both ends included) writes a JAX profiler trace of those steps to ``WORKDIR/profile``
(``plugins/profile/<time>/<host>.xplane.pb``, one file per process: TensorBoard's profile tab, or Perfetto through
``xprof``). Empty (the default): no profile. The trace starts before the first step's batch is taken (the
input pipeline's wait shows) and stops once the last step's computation is done."""
from __future__ import annotations

import re
from typing import Optional

import jax

from vita_jax import paths

_FORMAT = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse(value) -> Optional[tuple[int, int]]:
    """``(first, last)`` of ``config.profile_steps``; None when empty; a ``ValueError`` naming the field."""
    if value in (None, ""):
        return None
    m = _FORMAT.match(value) if isinstance(value, str) else None
    if m is None or not 1 <= int(m[1]) <= int(m[2]):
        raise ValueError(f"config.profile_steps = {value!r}: must be 'FIRST:LAST', steps counted from 1 with "
                         "FIRST <= LAST (e.g. '10:15'), or empty for no profile")
    return int(m[1]), int(m[2])


class Window:
    """Starts and stops the trace around the steps of ``config.profile_steps`` (nothing when it is empty)."""

    def __init__(self, config, workdir: str, log=print):
        self.steps, self.log, self.active = parse(config.get("profile_steps", "")), log, False
        self.staged = paths.Staged(paths.join(workdir, "profile")) if self.steps else None

    def before(self, step: int) -> None:
        """Before step ``step`` (from 1) is taken: starts the trace at the window's first step (or at the
        first step a resumed run takes inside the window)."""
        if self.steps and not self.active and self.steps[0] <= step <= self.steps[1]:
            jax.profiler.start_trace(self.staged.local)
            self.active = True

    def after(self, step: int, state) -> None:
        """After step ``step`` was dispatched: at the window's last step waits for it and stops the trace."""
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(state)
            self.close()
            self.log(f"profile of steps {self.steps[0]}:{self.steps[1]} written to {self.staged.remote}")

    def close(self) -> None:
        """Stops a trace still running (a run that ended or stopped inside the window) and uploads it."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            self.staged.close()
