"""What the step cache did in the last runs, for /memkit/status and the panel.

Runs in progress are held weakly (a run that is gone is never kept alive by this list) and report
their bytes as they are now; finished runs leave a plain dict (no tensors, no model), the newest
``KEEP`` of them. Read from the server thread, written from the executing thread: one lock.

Listeners (``add_listener``: the page's status push) are told when a run starts and when it ends,
from the executing thread, outside the lock; they must only note that something changed.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("memkit")

KEEP = 16


class ReportingRun(Protocol):
    number: int

    def report(self) -> dict[str, Any]: ...


_lock = threading.Lock()
_live: weakref.WeakSet = weakref.WeakSet()
_finished: deque[dict[str, Any]] = deque(maxlen=KEEP)
_numbers = itertools.count(1)
_listeners: list[Callable[[], None]] = []


def add_listener(listener: Callable[[], None]) -> None:
    """Call ``listener()`` whenever a run starts or ends (once per listener, however often added)."""
    with _lock:
        if listener not in _listeners:
            _listeners.append(listener)


def remove_listener(listener: Callable[[], None]) -> None:
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)


def _tell() -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener()
        except Exception as error:  # a listener never breaks sampling
            log.debug("[memkit] a step cache listener failed: %s", error)


def next_run_number() -> int:
    with _lock:
        return next(_numbers)


def started(run: ReportingRun) -> None:
    with _lock:
        _live.add(run)
    _tell()


def finished(run: ReportingRun, report: dict[str, Any]) -> None:
    with _lock:
        _live.discard(run)
        _finished.append(report)
    _tell()


def last_runs() -> list[dict[str, Any]]:
    """Reports, oldest first: the finished runs kept, then the runs in progress (state "running")."""
    with _lock:
        live = list(_live)
        done = list(_finished)
    running = sorted((run.report() for run in live), key=lambda r: r.get("run", 0))
    return done + running


def live_runs() -> list[ReportingRun]:
    """The runs in progress themselves (the step cache's ``StepCacheRun`` objects), oldest first."""
    with _lock:
        live = list(_live)
    return sorted(live, key=lambda run: getattr(run, "number", 0))


def clear() -> None:
    """Forget the finished runs (tests start from an empty registry)."""
    with _lock:
        _finished.clear()


def _size(nbytes: int) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GB"
    return f"{nbytes / 2**20:.1f} MB" if nbytes >= 2**20 else f"{nbytes / 2**10:.0f} KB"


def summary(report: dict[str, Any]) -> str:
    """One run in a few lines, for the node's text: steps skipped, the estimate, the memory held."""
    lines = [f"run {report.get('run')} ({report.get('state')}): skipped {report.get('steps_skipped', 0)} of "
             f"{report.get('steps_total', 0)} steps (estimated speed-up {report.get('estimated_speedup', 1.0):.2f}x)"]
    for tier, use in report.get("devices", {}).items():
        lines.append(f"{tier} ({use['device']}): {_size(use['bytes'])} now, {_size(use['peak_bytes'])} peak")
    if report.get("spilled") or report.get("dropped"):
        lines.append(f"over budget: {report.get('spilled', 0)} spilled, {report.get('dropped', 0)} computed instead")
    return "\n".join(lines)
