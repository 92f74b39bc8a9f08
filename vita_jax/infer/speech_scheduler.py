"""Speech-code requests of many callers (the live server's sessions) on one :class:`DecodeSlots`.

``submit(x, opts)`` returns a :class:`CodeStream` at once: an iterator of the request's codes as the
engine thread produces them (several per dispatch). The thread admits waiting requests into free slots,
runs one dispatch for all active rows, hands each row its codes, and frees the slot of a row that ended
(EOS, its ``max_tokens``) or was cancelled (:meth:`CodeStream.cancel`, or its ``stop()`` returning True):
a cancelled row stops between two dispatches.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Callable, Optional

import numpy as np

from vita_jax.infer.speech_engine import DecodeSlots, SlotOptions

log = logging.getLogger(__name__)


class CodeStream:
    """One request's codes (ints, special ids other than EOS included, as ``iter_codes``). Iterating
    blocks until the engine has more; leaving the loop early (or :meth:`cancel`) frees the slot."""

    def __init__(self, x, opts: SlotOptions, stop: Optional[Callable[[], bool]]):
        self.x, self.opts, self.stop = x, opts, stop
        self._q: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self.t_submit, self.t_first = time.perf_counter(), None

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set() or (self.stop is not None and bool(self.stop()))

    def __iter__(self):
        try:
            while (item := self._q.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            self.cancel()


class SpeechScheduler:
    """A thread that drives :class:`DecodeSlots` for every submitted request (see the module docstring).
    ``stats()`` reports dispatches, rows per dispatch and the compiled programs."""

    def __init__(self, speech, slots: int = 4, steps: int = 8, max_input: int = 1024, max_tokens: int = 1000,
                 window: int = 16, warmup: bool = True):
        self.engine = DecodeSlots(speech, slots=slots, steps=steps, max_input=max_input, max_tokens=max_tokens,
                                  window=window)
        if warmup:
            self.engine.warmup()
        self._pending: collections.deque[CodeStream] = collections.deque()
        self._rows: dict[int, CodeStream] = {}
        self._cv = threading.Condition()
        self._closed = False
        self.dispatches, self.rows_dispatched = 0, 0
        self._compiled_at_start = sum(self.engine.compiled().values())
        self._thread = threading.Thread(target=self._loop, name="speech-engine", daemon=True)
        self._thread.start()

    def submit(self, x, opts: SlotOptions = SlotOptions(), stop: Optional[Callable[[], bool]] = None) -> CodeStream:
        """Queues decoder input ``x [n, idim]`` (or ``[1, n, idim]``; n >= 1). Checked here, so that a bad
        request fails its caller, not the engine."""
        x = np.asarray(x, np.float32)
        x = x[0] if x.ndim == 3 and x.shape[0] == 1 else x  # [1, n, idim] as iter_codes takes it
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != self.engine.cfg.idim:
            raise ValueError(f"speech decoder input must be [n >= 1, {self.engine.cfg.idim}], got {x.shape}")
        self.engine.bucket(x.shape[0])  # too long: the caller's error, now
        req = CodeStream(x, opts, stop)
        with self._cv:
            if self._closed:
                raise RuntimeError("the speech engine is closed")
            self._pending.append(req)
            self._cv.notify()
        return req

    def takes(self, rows: int, max_tokens: int) -> bool:
        """Whether a request of ``rows`` input rows and ``max_tokens`` fits the slots' fixed shapes."""
        return 0 < rows <= self.engine.ladder[-1] and 0 < max_tokens <= self.engine.max_tokens

    def stats(self) -> dict:
        return dict(dispatches=self.dispatches,
                    rows_per_dispatch=round(self.rows_dispatched / max(self.dispatches, 1), 3),
                    compiles_after_warmup=sum(self.engine.compiled().values()) - self._compiled_at_start)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the engine thread
    def _admit(self) -> None:
        free = [s for s in range(self.engine.slots) if s not in self._rows]
        while free and self._pending:
            req = self._pending.popleft()
            if req.cancelled:
                req._q.put(None)
                continue
            slot = free.pop(0)
            try:
                self.engine.join(slot, req.x, req.opts)
            except Exception as e:  # a request's own error (its options) ends it, not the engine
                req._q.put(e)
                free.insert(0, slot)
                continue
            self._rows[slot] = req

    def _finish(self, slot: int, leave: bool) -> None:
        req = self._rows.pop(slot)
        if leave:
            self.engine.leave(slot)
        req._q.put(None)

    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._closed and not self._pending and not self._rows:
                        self._cv.wait()
                    if self._closed:
                        break
                    self._admit()
                for slot in [s for s, r in self._rows.items() if r.cancelled]:
                    self._finish(slot, leave=True)
                if not self._rows:
                    continue
                codes, active = self.engine.decode()
                self.dispatches += 1
                self.rows_dispatched += len(self._rows)
                for slot, req in list(self._rows.items()):
                    got = codes[slot][codes[slot] >= 0].tolist()
                    if got:
                        req.t_first = req.t_first or time.perf_counter()
                        req._q.put(got)
                    if not active[slot]:
                        self._finish(slot, leave=False)
        except Exception as e:  # the device failed: every waiting caller hears of it
            log.exception("speech engine failed")
            err = e
        else:
            err = None
        with self._cv:
            self._closed = True
            for req in list(self._rows.values()) + list(self._pending):
                req._q.put(err if err is not None else None)
            self._rows.clear()
            self._pending.clear()
