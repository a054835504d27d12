"""The process-wide model cache: single-flight loads, LRU eviction under a RAM budget, pinning.

Pure Python: it stores whatever the ``load`` callable returns and measures it with the
``measure`` callable it was given, so its policy is tested without ComfyUI. Handing out clones
and talking to ComfyUI is the caller's job (``model_cache.service``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .recipe import LoadRecipe

log = logging.getLogger("memkit.cache")


class CacheLoadError(RuntimeError):
    """A load failed; every request that waited on it gets this error."""


@dataclass
class CacheEntry:
    recipe: LoadRecipe
    alias: str
    value: Any
    nbytes: int
    pinned: bool
    load_seconds: float
    hits: int = 0
    last_used: float = field(default_factory=time.monotonic)
    device: str = "cpu"

    @property
    def key(self) -> str:
        return self.recipe.key


@dataclass(frozen=True)
class LoadOutcome:
    value: Any
    entry: CacheEntry
    hit: bool


class _Flight:
    """One load in progress; the requests that arrive meanwhile wait on it."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.done = threading.Event()
        self.entry: CacheEntry | None = None
        self.error: BaseException | None = None


class ModelCache:
    """Thread-safe cache of loaded models keyed by their load recipe."""

    def __init__(self, measure: Callable[[Any], int], budget_bytes: int | None = None) -> None:
        self._measure = measure
        self.budget_bytes = budget_bytes
        self._lock = threading.RLock()
        self._entries: dict[str, CacheEntry] = {}
        self._flights: dict[str, _Flight] = {}
        self.loads = 0
        self.evictions = 0

    # --- requests -------------------------------------------------------------------------

    def get_or_load(self, recipe: LoadRecipe, load: Callable[[], Any], *, alias: str | None = None,
                    pinned: bool = False) -> LoadOutcome:
        """Return the cached value for ``recipe``, loading it once if no one has yet."""
        alias = alias or recipe.default_alias()
        with self._lock:
            entry = self._entries.get(recipe.key)
            if entry is not None:
                self._touch(entry, pinned)
                return LoadOutcome(entry.value, entry, hit=True)
            flight = self._flights.get(recipe.key)
            owner = flight is None
            if owner:
                flight = self._flights[recipe.key] = _Flight(alias)
        if not owner:
            return self._wait_for(flight, pinned)
        return self._load(recipe, load, alias, pinned, flight)

    def _wait_for(self, flight: _Flight, pinned: bool) -> LoadOutcome:
        flight.done.wait()
        if flight.error is not None:
            raise CacheLoadError(f"loading {flight.alias} failed: {flight.error}") from flight.error
        with self._lock:
            self._touch(flight.entry, pinned)
        return LoadOutcome(flight.entry.value, flight.entry, hit=True)

    def _load(self, recipe: LoadRecipe, load: Callable[[], Any], alias: str, pinned: bool,
              flight: _Flight) -> LoadOutcome:
        try:
            with self._lock:
                self._make_room(recipe.file_bytes, keep=recipe.key)
            started = time.perf_counter()
            value = load()
            seconds = time.perf_counter() - started
            nbytes = self._measure(value)
        except BaseException as error:
            with self._lock:
                del self._flights[recipe.key]
            flight.error = error
            flight.done.set()
            raise
        entry = CacheEntry(recipe, alias, value, nbytes, pinned, seconds)
        with self._lock:
            self._drop_stale(recipe)
            self._entries[recipe.key] = entry
            self.loads += 1
            del self._flights[recipe.key]
            self._make_room(0, keep=recipe.key)
        flight.entry = entry
        flight.done.set()
        log.info("cached %s (%.1f MB) in %.2f s", alias, nbytes / 2**20, seconds)
        return LoadOutcome(value, entry, hit=False)

    def _touch(self, entry: CacheEntry, pinned: bool) -> None:
        entry.hits += 1
        entry.last_used = time.monotonic()
        entry.pinned = entry.pinned or pinned

    # --- eviction -------------------------------------------------------------------------

    def _drop_stale(self, recipe: LoadRecipe) -> None:
        """A changed file makes a new recipe with the same lineage: the old entry is stale."""
        for key, entry in list(self._entries.items()):
            if entry.recipe.lineage == recipe.lineage and key != recipe.key:
                log.info("%s changed on disk; dropping the stale copy", entry.alias)
                self._remove(key)

    def _make_room(self, incoming_bytes: int, keep: str) -> None:
        if self.budget_bytes is None:
            return
        candidates = sorted((e for e in self._entries.values() if not e.pinned and e.key != keep),
                            key=lambda e: e.last_used)
        while self.used_bytes + incoming_bytes > self.budget_bytes and candidates:
            victim = candidates.pop(0)
            log.info("evicting %s (%.1f MB) to stay within the %.1f GB budget",
                     victim.alias, victim.nbytes / 2**20, self.budget_bytes / 2**30)
            self._remove(victim.key)
            self.evictions += 1
        if self.used_bytes + incoming_bytes > self.budget_bytes:
            log.warning("cache holds %.1f MB of pinned or in-flight models, over the %.1f GB budget",
                        (self.used_bytes + incoming_bytes) / 2**20, self.budget_bytes / 2**30)

    def _remove(self, key: str) -> CacheEntry | None:
        # Dropping our reference is safe for a running prompt: it holds its own clone, whose
        # weights stay alive until the prompt lets go of them.
        return self._entries.pop(key, None)

    def evict(self, name: str) -> list[str]:
        """Drop the entries whose alias, key or file name is ``name``; returns their aliases."""
        with self._lock:
            victims = self.find(name)
            for entry in victims:
                self._remove(entry.key)
                self.evictions += 1
            return [e.alias for e in victims]

    def clear(self, include_pinned: bool = False) -> list[str]:
        with self._lock:
            victims = [e for e in self._entries.values() if include_pinned or not e.pinned]
            for entry in victims:
                self._remove(entry.key)
            self.evictions += len(victims)
            return [e.alias for e in victims]

    # --- inspection -----------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def entries(self) -> list[CacheEntry]:
        with self._lock:
            return list(self._entries.values())

    def loading(self) -> list[str]:
        with self._lock:
            return [f.alias for f in self._flights.values()]

    def find(self, name: str) -> list[CacheEntry]:
        """Entries named ``name`` by alias, key, or the file name of one of their files."""
        with self._lock:
            exact = [e for e in self._entries.values() if name in (e.alias, e.key)]
            if exact:
                return exact
            return [e for e in self._entries.values()
                    if any(p == name or p.endswith(("/" + name, "\\" + name)) for p in e.recipe.paths)]

    def by_alias(self, alias: str) -> CacheEntry | None:
        with self._lock:
            return next((e for e in self._entries.values() if e.alias == alias), None)
