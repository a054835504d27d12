"""Start-up preloading: its progress, and the one part that may run on any thread.

How a preload runs depends on the thread rule (ComfyUI's model management is not thread-safe):

* ``blocking``: every entry is loaded while ComfyUI starts, before its prompt worker exists,
  so no prompt can run meanwhile.
* ``background``: a thread reads the entries' files (``warm_page_cache``: plain file reads, no
  ComfyUI call), then the models are built on ComfyUI's executing thread by a ``MemKitPreload``
  prompt put on ComfyUI's own queue, between the user's prompts, never beside one.

``PreloadState`` is written by whichever thread runs the preload and read by the routes and
nodes, so every access takes its lock and readers get snapshots.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

log = logging.getLogger("memkit.preload")

READ_CHUNK = 16 * 2**20


def warm_page_cache(paths: Iterable[str]) -> int:
    """Read files once so that the loader that follows reads them from RAM; returns bytes read.

    Reads only: it touches no ComfyUI state, so it may run beside a prompt.
    """
    total = 0
    buffer = bytearray(READ_CHUNK)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while read := handle.readinto(buffer):
                total += read
    return total


@dataclass(frozen=True)
class PreloadSnapshot:
    mode: str
    phase: str
    total: int
    done: int
    failures: dict[str, str]
    started: float | None
    finished: float | None
    warmup: bool = False
    warmup_error: str | None = None

    @property
    def state(self) -> str:
        """What ``/memkit/ready`` reports: starting, preloading, warming, ready or degraded."""
        if self.phase == "starting":
            return "starting"
        if self.phase in ("reading", "queued", "loading"):
            return "preloading"
        if self.phase == "warming":
            return "warming"
        return "degraded" if self.failures or self.warmup_error else "ready"

    @property
    def ready(self) -> bool:
        return self.state in ("ready", "degraded")


class PreloadState:
    """Progress of the current (or last) preload run.

    Phases: starting (configured, not begun), reading (files read ahead), queued (the preload
    prompt waits on ComfyUI's queue), loading, warming (the warm-up workflow runs), done; idle
    when nothing is configured. Results are kept per cache key, so a run that passes an entry
    twice (a blocking load, then its placement on the device by the queued prompt) counts it once.
    """

    def __init__(self, mode: str = "off", expected: bool = False) -> None:
        self.mode = mode
        self._lock = threading.Lock()
        self._phase = "starting" if expected else "idle"
        self._total = 0
        self._results: dict[str, str | None] = {}
        self._started: float | None = None
        self._finished: float | None = None
        self._run_id: str | None = None
        self._warmup = False
        self._warmup_error: str | None = None

    def begin(self, total: int, phase: str, run_id: str | None = None, warmup: bool = False) -> bool:
        """Start a run of ``total`` entries (and then a warm-up); False when one is already under way."""
        with self._lock:
            if self._phase not in ("starting", "idle", "done"):
                return False
            self._phase, self._total, self._results, self._run_id = phase, total, {}, run_id
            self._warmup, self._warmup_error = warmup, None
            self._started, self._finished = time.time(), None
            return True

    def owns(self, run_id: str) -> bool:
        """Whether ``run_id`` is the run whose models are still to be reported (by its queued
        preload prompt); no longer once they are, even while the warm-up runs."""
        with self._lock:
            return bool(run_id) and run_id == self._run_id and self._phase in ("reading", "queued", "loading")

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self._phase = phase

    def entry_done(self, alias: str, error: str | None = None) -> None:
        with self._lock:
            if error is not None or self._results.get(alias) is None:
                self._results[alias] = error

    def finish(self) -> PreloadSnapshot:
        """The models are done: ready, or warming when a warm-up workflow follows."""
        with self._lock:
            if self._warmup:
                self._phase = "warming"
            else:
                self._phase, self._finished = "done", time.time()
        return self.snapshot()

    def warmup_finished(self, error: str | None = None) -> None:
        with self._lock:
            self._warmup = False
            self._warmup_error = error
            self._phase, self._finished = "done", time.time()

    def clear_failure(self, alias: str) -> None:
        with self._lock:
            if self._results.get(alias) is not None:
                self._results[alias] = None

    def snapshot(self) -> PreloadSnapshot:
        with self._lock:
            failures = {alias: error for alias, error in self._results.items() if error is not None}
            return PreloadSnapshot(self.mode, self._phase, self._total, len(self._results), failures,
                                   self._started, self._finished, self._warmup, self._warmup_error)
