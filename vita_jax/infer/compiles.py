"""XLA compilations of this process, counted from jax's monitoring events: what the server reports per
turn (``turn_metrics.compiles``) and ``bench serve`` after warm-up (a warm server compiles nothing)."""
from __future__ import annotations

import threading

import jax

# jax records it around every backend compilation (a persistent-cache hit included: an executable built)
EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_count = 0
_listening = False


def _listen(event: str, duration: float, **kw) -> None:
    global _count
    if event == EVENT:
        with _lock:
            _count += 1


def count() -> int:
    """Compilations since the first call (which starts the count)."""
    global _listening
    with _lock:
        if not _listening:
            jax.monitoring.register_event_duration_secs_listener(_listen)
            _listening = True
        return _count
