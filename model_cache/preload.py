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
from collections.abc import Callable, Iterable
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


PHASES = ("idle", "starting", "reading", "queued", "loading", "warming", "done")
NOT_LOADED = "not loaded: the preload ended before this entry was reached"


@dataclass(frozen=True)
class PreloadSnapshot:
    """The preload as ``/memkit/ready`` and status report it (a copy: safe to read anywhere)."""

    mode: str
    phase: str
    total: int
    done: int
    failures: dict[str, str]
    warmup: bool = False
    warmup_error: str | None = None
    error: str | None = None  # why the run as a whole went wrong (e.g. its prompt was refused)

    @property
    def state(self) -> str:
        """starting, preloading, warming, ready or degraded (a failure, or the warm-up failed)."""
        if self.phase == "starting":
            return "starting"
        if self.phase in ("reading", "queued", "loading"):
            return "preloading"
        if self.phase == "warming":
            return "warming"
        return "degraded" if self.failures or self.warmup_error or self.error else "ready"

    @property
    def ready(self) -> bool:
        return self.state in ("ready", "degraded")


class PreloadState:
    """The one owner of the preload lifecycle: every path reports here, and only here.

    A run knows its cache keys (a list, never a delimited string). Phases: starting (configured,
    not begun), reading (files read ahead), queued (the preload prompt waits on ComfyUI's queue),
    loading, warming (the warm-up workflow runs), done; idle when nothing is configured.

    Rules that make ``/memkit/ready`` true:

    * ``finish`` gives every key of the run that has no outcome yet a failure with the reason,
      so a run never ends as ready with an entry unaccounted for; it is idempotent and only the
      run that is still open can be finished (by its node's ``finally`` or by the thread that
      queued it, whichever comes first).
    * Failures are kept per cache key across runs: a failed load records one wherever it
      happened (``entry_done``), a later successful load clears it (``clear_failure``), and a
      new run of that key starts it afresh (the page shows a new failure as new).
    * ``on_change`` is called after every transition (outside the lock): the page's live status
      follows the preload without hand-placed notifications.
    """

    def __init__(self, mode: str = "off", expected: bool = False,
                 on_change: Callable[[], None] | None = None) -> None:
        self.mode = mode
        self._lock = threading.Lock()
        self._on_change = on_change
        self._phase = "starting" if expected else "idle"
        self._keys: list[str] = []
        self._queued: list[str] = []
        self._reported: set[str] = set()
        self._failures: dict[str, str] = {}
        self._run_id: str | None = None
        self._warmup = False
        self._warmup_error: str | None = None
        self._error: str | None = None

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception as error:  # a listener never breaks the preload
                log.debug("[memkit] a preload listener failed: %s", error)

    def begin(self, keys: Iterable[str], phase: str, run_id: str | None = None, warmup: bool = False) -> bool:
        """Start a run of these cache keys (repeats count once), then a warm-up if ``warmup``;
        False when a run is under way already."""
        if phase not in ("reading", "queued", "loading"):
            raise ValueError(f"a run begins reading, queued or loading, not {phase!r}")
        with self._lock:
            if self._phase not in ("starting", "idle", "done"):
                return False
            self._keys = list(dict.fromkeys(keys))
            for key in self._keys:  # tried again: its old failure no longer holds until this run says
                self._failures.pop(key, None)
            self._queued, self._reported, self._run_id = [], set(), run_id
            self._phase, self._warmup, self._warmup_error, self._error = phase, warmup, None, None
        self._changed()
        return True

    def owns(self, run_id: str) -> bool:
        """Whether ``run_id`` is the open run whose models are still to be reported."""
        with self._lock:
            return bool(run_id) and run_id == self._run_id and self._phase in ("reading", "queued", "loading")

    def queue(self, run_id: str, keys: Iterable[str]) -> None:
        """The keys the run's queued prompt is to load (or place on the device), in order: they have
        no outcome until that prompt reports them (a blocking preload's loaded entries still wait
        for their placement)."""
        with self._lock:
            if run_id == self._run_id:
                self._queued = list(dict.fromkeys(keys))
                self._reported.difference_update(self._queued)
        self._changed()

    def queued(self, run_id: str) -> list[str] | None:
        """The keys handed to run ``run_id``'s prompt; None when that run is not open (any more)."""
        with self._lock:
            owned = bool(run_id) and run_id == self._run_id and self._phase in ("reading", "queued", "loading")
            return list(self._queued) if owned else None

    def set_phase(self, phase: str, run_id: str | None = None) -> None:
        """Move the open run on (reading → queued → loading); ignored once it has ended."""
        with self._lock:
            if self._phase not in ("reading", "queued", "loading") or (run_id and run_id != self._run_id):
                return
            self._phase = phase
        self._changed()

    def entry_done(self, key: str, error: str | None = None) -> None:
        """An outcome for a cache key: a failure is kept (until a later success), a success clears one."""
        with self._lock:
            if key in self._keys:
                self._reported.add(key)
            if error is not None:
                self._failures[key] = error
            else:
                self._failures.pop(key, None)
        self._changed()

    def clear_failure(self, key: str) -> None:
        """A successful load of ``key`` anywhere (a selector, a loader node, a preload)."""
        with self._lock:
            if self._failures.pop(key, None) is None:
                return
        self._changed()

    def finish(self, run_id: str | None = None, reason: str | None = None) -> bool:
        """End the open run (only it, when ``run_id`` is given): every key without an outcome
        fails with ``reason``; then warming when a warm-up follows, else done. A start-up that
        never began a run ends with ``reason`` as its error. False if there was nothing to end."""
        with self._lock:
            if self._phase == "starting" and reason is not None and not run_id:
                self._phase, self._error, self._warmup = "done", reason, False
            elif self._phase in ("reading", "queued", "loading") and (not run_id or run_id == self._run_id):
                missing = [key for key in self._keys if key not in self._reported]
                for key in missing:
                    self._reported.add(key)
                    self._failures[key] = reason or NOT_LOADED
                if reason is not None:
                    self._error = reason
                self._phase = "warming" if self._warmup else "done"
            else:
                return False
        self._changed()
        return True

    def warmup_finished(self, error: str | None = None) -> None:
        with self._lock:
            self._warmup = False
            self._warmup_error = error
            self._phase = "done"
        self._changed()

    def snapshot(self) -> PreloadSnapshot:
        with self._lock:
            done = sum(1 for key in self._keys if key in self._reported)
            return PreloadSnapshot(self.mode, self._phase, len(self._keys), done, dict(self._failures),
                                   self._warmup, self._warmup_error, self._error)
