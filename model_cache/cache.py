"""The process-wide model cache: single-flight loads, LRU eviction under a RAM budget, pinning.

Pure Python: it stores whatever the ``load`` callable returns and measures it with the
``measure`` callable it was given, so its policy is tested without ComfyUI. Handing out clones
and talking to ComfyUI is the caller's job (``model_cache.service``).

Honest accounting, because users size machines from these numbers:

* RAM and accelerator memory are measured apart (``Footprint``); only RAM counts against the
  budget, and footprints are measured again before every eviction decision, since ComfyUI moves
  weights between devices after we loaded them.
* A load in flight reserves what it takes at its peak (the ``estimate`` the caller gives: for
  ComfyUI, the file's tensors read into RAM plus the model as it will be held) until it is measured.
* An evicted value that is still alive (a running prompt or ComfyUI's output cache holds a clone)
  is kept as a weak reference: status shows the memory it still holds, and the next request
  adopts it again instead of loading a second copy.

Dropping the last reference to a model runs ComfyUI's finalizers, which change its model
management, so it must happen on ComfyUI's executing thread. Callers on other threads (HTTP
routes) evict with ``defer=True``: the entries leave the cache at once but are held until the
executing thread calls ``release_deferred``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .recipe import LoadRecipe

log = logging.getLogger("memkit.cache")


class CacheLoadError(RuntimeError):
    """A load failed; every request that waited on it gets this error."""


class LoadWaitInterruptedError(RuntimeError):
    """The caller stopped waiting for another thread's load; that load carries on."""


class BudgetExceededError(RuntimeError):
    """``refuse_over_budget``: this load would take the cache over its RAM budget."""


@dataclass(frozen=True)
class Footprint:
    """Bytes a cached value holds: private RAM (counted against the budget), RAM mapped from
    the model's file (the page cache can drop and reread it, so it is reported, not budgeted),
    RAM of the shared weight store's file that every process maps (the store's own cap counts
    it, not the budget) and accelerator memory."""

    ram: int = 0
    vram: int = 0
    mapped: int = 0
    shared: int = 0

    def __add__(self, other: Footprint) -> Footprint:
        return Footprint(self.ram + other.ram, self.vram + other.vram, self.mapped + other.mapped,
                         self.shared + other.shared)


@dataclass
class CacheEntry:
    recipe: LoadRecipe
    cache_key: str
    value: Any
    footprint: Footprint
    pinned: bool
    load_seconds: float
    seq: int
    hits: int = 0
    uses: int = 0
    last_used: float = field(default_factory=time.monotonic)
    last_use_token: object = None
    pinned_by_user: bool | None = None  # set through ``set_pinned`` (the page, /memkit/pin): it sticks
    stale: str | None = None  # its file changed and the reload failed (why): still served, never plainly ready

    @property
    def key(self) -> str:
        return self.recipe.key


@dataclass(frozen=True)
class RetiredEntry:
    """An evicted entry whose value something else still holds (status: memory not yet freed)."""

    recipe: LoadRecipe
    cache_key: str
    footprint: Footprint
    ref: weakref.ref

    @property
    def key(self) -> str:
        return self.recipe.key


@dataclass(frozen=True)
class LoadOutcome:
    value: Any
    entry: CacheEntry
    hit: bool


@dataclass(frozen=True)
class CacheSnapshot:
    """The cache as it was at one instant (one hold of its lock), for status: rows, totals and
    the budget read from separate calls could each be true and still disagree with each other
    while loads and evictions run. Entries are copies, so later hits or pins do not change them."""

    entries: list[CacheEntry]
    loading: list[tuple[str, int]]  # (cache_key, requests waiting for it)
    releasing: list[CacheEntry]
    retired: list[RetiredEntry]
    reserved_bytes: int
    budget_bytes: int | None
    refuse_over_budget: bool
    loads: int
    evictions: int
    readoptions: int

    @property
    def footprint(self) -> Footprint:
        """The entries' footprints as last measured (``remeasure``): reading it measures nothing."""
        return sum((e.footprint for e in self.entries), Footprint())

    @property
    def over_budget_bytes(self) -> int:
        """How far the cached entries' private RAM is over the budget (pinned entries can be)."""
        if self.budget_bytes is None:
            return 0
        return max(0, self.footprint.ram - self.budget_bytes)


class _Flight:
    """One load in progress; the requests that arrive meanwhile wait on it."""

    def __init__(self, cache_key: str, reserved: int) -> None:
        self.cache_key = cache_key
        self.reserved = reserved
        self.waiters = 0
        self.done = threading.Event()
        self.entry: CacheEntry | None = None
        self.error: BaseException | None = None


class ModelCache:
    """Thread-safe cache of loaded models keyed by their load recipe."""

    def __init__(self, measure: Callable[[Any], Footprint], budget_bytes: int | None = None,
                 wait_poll_seconds: float = 0.05, *, estimate: Callable[[LoadRecipe], int] | None = None,
                 refuse_over_budget: bool = False, reclaim: Callable[[], None] | None = None) -> None:
        self._measure = measure
        self._estimate = estimate or (lambda recipe: recipe.file_bytes)
        self._reclaim = reclaim
        self.budget_bytes = budget_bytes
        self.refuse_over_budget = refuse_over_budget
        self._wait_poll = wait_poll_seconds
        self._lock = threading.RLock()
        self._entries: dict[str, CacheEntry] = {}
        self._flights: dict[str, _Flight] = {}
        self._retired: dict[str, RetiredEntry] = {}
        self._releasing: dict[str, CacheEntry] = {}
        self._seq = itertools.count(1)
        self.loads = 0
        self.evictions = 0
        self.readoptions = 0

    # --- requests -------------------------------------------------------------------------

    def get_or_load(self, recipe: LoadRecipe, load: Callable[[], Any], *, cache_key: str | None = None,
                    pinned: bool = False, use_token: object = None,
                    interrupted: Callable[[], bool] | None = None) -> LoadOutcome:
        """Return the cached value for ``recipe``, loading it once if no one has yet.

        ``interrupted`` is polled while waiting for another thread's load; when it answers true
        the wait ends with ``LoadWaitInterruptedError`` and the load itself is left to finish.
        """
        cache_key = cache_key or recipe.key
        with self._lock:
            seq = next(self._seq)
            entry = self._entries.get(recipe.key) or self._readopt(recipe.key, cache_key, pinned, seq)
            if entry is not None:
                self._hit(entry, pinned, use_token)
                return LoadOutcome(entry.value, entry, hit=True)
            flight = self._flights.get(recipe.key)
            owner = flight is None
            if owner:
                flight = self._flights[recipe.key] = _Flight(cache_key, self._reserve(recipe))
            else:
                flight.waiters += 1
        if not owner:
            return self._wait_for(flight, pinned, use_token, interrupted)
        return self._load(recipe, load, cache_key, pinned, flight, seq, use_token)

    def _wait_for(self, flight: _Flight, pinned: bool, use_token: object,
                  interrupted: Callable[[], bool] | None) -> LoadOutcome:
        while not flight.done.wait(self._wait_poll):
            if interrupted is not None and interrupted():
                raise LoadWaitInterruptedError(f"stopped waiting for {flight.cache_key}, which another thread is "
                                               "loading; that load goes on and will be cached")
        if flight.error is not None:
            raise CacheLoadError(f"loading {flight.cache_key} failed: {flight.error}") from flight.error
        with self._lock:
            self._hit(flight.entry, pinned, use_token)
        return LoadOutcome(flight.entry.value, flight.entry, hit=True)

    def _load(self, recipe: LoadRecipe, load: Callable[[], Any], cache_key: str, pinned: bool,
              flight: _Flight, seq: int, use_token: object) -> LoadOutcome:
        try:
            with self._lock:
                evictions = self.evictions
                self._make_room(keep=recipe.key)
                self._refuse_if_over(cache_key, self._committed_ram(), "would take")
            if self.evictions != evictions and self._reclaim is not None:
                self._reclaim()  # give the evicted models' memory back before the load needs it
            started = time.perf_counter()
            value = load()
            seconds = time.perf_counter() - started
            footprint = self._measure(value)
            entry = CacheEntry(recipe, cache_key, value, footprint, pinned, seconds, seq, uses=1,
                               last_use_token=use_token)
            with self._lock:
                del self._flights[recipe.key]
                if self._newer_version_cached(recipe, seq):
                    log.info("%s changed on disk while it loaded; the newer copy stays cached", cache_key)
                else:
                    self._make_room(keep=recipe.key, extra=footprint.ram)
                    self._refuse_if_over(cache_key, self._committed_ram() + footprint.ram, "took")
                    self._drop_stale(recipe)
                    self._entries[recipe.key] = entry
                    self._retired.pop(recipe.key, None)
                    self.loads += 1
            flight.entry = entry
        except BaseException as error:
            with self._lock:
                self._flights.pop(recipe.key, None)
            flight.error = error
            raise
        finally:
            flight.done.set()  # waiters wake up whatever happened
        log.info("cached %s (%.1f MB RAM, %.1f MB VRAM) in %.2f s", cache_key, footprint.ram / 2**20,
                 footprint.vram / 2**20, seconds)
        return LoadOutcome(value, entry, hit=False)

    def _hit(self, entry: CacheEntry, pinned: bool, use_token: object) -> None:
        entry.hits += 1
        if entry.pinned_by_user is None:  # a request may pin (a config entry); a user's choice stays
            entry.pinned = entry.pinned or pinned
        self._use(entry, use_token)

    def set_pinned(self, name: str, pinned: bool) -> list[str]:
        """Pin or unpin the entries ``find(name)`` matches, as the user's choice: later requests
        (a selector of a config entry, a preload) do not change it back. Returns their cache keys."""
        with self._lock:
            found = self.find(name)
            for entry in found:
                entry.pinned = entry.pinned_by_user = pinned
            return [entry.cache_key for entry in found]

    def _use(self, entry: CacheEntry, use_token: object) -> None:
        entry.last_used = time.monotonic()
        if use_token is None or use_token != entry.last_use_token:
            entry.uses += 1
        entry.last_use_token = use_token

    def touch(self, key: str, use_token: object = None) -> bool:
        """A prompt uses this entry even if ComfyUI's output cache answers the loader: keep LRU true.

        ``use_token`` (e.g. the prompt id) makes repeated calls within one prompt count once.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            self._use(entry, use_token)
            return True

    def _readopt(self, key: str, cache_key: str, pinned: bool, seq: int) -> CacheEntry | None:
        """An evicted value still at hand (waiting for release, or alive elsewhere) comes back."""
        entry = self._releasing.pop(key, None)
        if entry is None:
            retired = self._retired.pop(key, None)
            value = retired.ref() if retired is not None else None
            if value is None:
                return None
            entry = CacheEntry(retired.recipe, cache_key, value, self._measure(value), pinned, 0.0, seq)
        self._entries[key] = entry
        self.readoptions += 1
        log.info("re-adopted %s: evicted earlier but still held, so not loaded again", cache_key)
        self._make_room(keep=key)
        return entry

    # --- eviction -------------------------------------------------------------------------

    def _newer_version_cached(self, recipe: LoadRecipe, seq: int) -> bool:
        return any(e.recipe.lineage == recipe.lineage and e.key != recipe.key and e.seq > seq
                   for e in self._entries.values())

    def _drop_stale(self, recipe: LoadRecipe) -> None:
        """A changed file makes a new recipe with the same lineage: the old entry is stale."""
        for key, entry in list(self._entries.items()):
            if entry.recipe.lineage == recipe.lineage and key != recipe.key:
                log.info("%s changed on disk; dropping the stale copy", entry.cache_key)
                self._remove(key, retire=False)

    def remeasure(self) -> None:
        """Measure every entry again (ComfyUI moves weights between devices after we loaded them).

        Called off the server's event loop (the status watcher, the executing thread); the
        measuring happens outside the lock, so requests never wait for it."""
        with self._lock:
            entries = list(self._entries.values())
        measured = [(entry, self._measure(entry.value)) for entry in entries]
        with self._lock:
            for entry, footprint in measured:
                if self._entries.get(entry.key) is entry:
                    entry.footprint = footprint

    def _reserve(self, recipe: LoadRecipe) -> int:
        """What a load takes in RAM at its peak (``estimate``, e.g. nothing for a model mapped from
        the shared weight store; its files' size when the estimate fails), held against the budget
        until it is measured."""
        try:
            return max(0, int(self._estimate(recipe)))
        except Exception as error:  # an estimate never stops a load
            log.debug("estimating %s failed: %s", recipe.key, error)
            return recipe.file_bytes

    def _refuse_if_over(self, cache_key: str, committed: int, verb: str) -> None:
        if self.refuse_over_budget and self.budget_bytes is not None and committed > self.budget_bytes:
            pinned = sum(e.footprint.ram for e in self._entries.values() if e.pinned)
            raise BudgetExceededError(
                f"loading {cache_key} {verb} the MemKit cache to {committed / 2**30:.2f} GB of RAM, over its budget "
                f"(settings.ram_budget_gb = {self.budget_bytes / 2**30:.2f} GB; pinned entries hold "
                f"{pinned / 2**30:.2f} GB); refused because settings.refuse_over_budget is on: unpin or evict "
                "entries, or raise the budget")

    def _make_room(self, keep: str, extra: int = 0) -> None:
        """Evict least-recently-used unpinned entries until cached + in-flight RAM (+ ``extra``, a
        measured load not stored yet) fits the budget."""
        if self.budget_bytes is None:
            return
        for entry in self._entries.values():  # loads run on the executing thread, never on the event loop
            entry.footprint = self._measure(entry.value)
        candidates = sorted((e for e in self._entries.values() if not e.pinned and e.key != keep),
                            key=lambda e: e.last_used)
        while self._committed_ram() + extra > self.budget_bytes and candidates:
            victim = candidates.pop(0)
            log.info("evicting %s (%.1f MB) to stay within the %.1f GB budget",
                     victim.cache_key, victim.footprint.ram / 2**20, self.budget_bytes / 2**30)
            self._remove(victim.key)
            self.evictions += 1
        if self._committed_ram() + extra > self.budget_bytes and not self.refuse_over_budget:
            log.warning("cache holds %.1f MB of pinned or in-flight models, over the %.1f GB budget (status shows "
                        "by how much)", (self._committed_ram() + extra) / 2**20, self.budget_bytes / 2**30)

    def _committed_ram(self) -> int:
        return sum(e.footprint.ram for e in self._entries.values()) + sum(f.reserved for f in self._flights.values())

    def _remove(self, key: str, retire: bool = True) -> CacheEntry | None:
        # Dropping our reference is safe for a running prompt: it holds its own clone. If the value
        # lives on (a clone keeps it), remember it weakly so that status and re-adoption see it.
        entry = self._entries.pop(key, None)
        if entry is not None and retire:
            self._retire(entry)
        return entry

    def _retire(self, entry: CacheEntry) -> None:
        with contextlib.suppress(TypeError):  # a value that cannot be weakly referenced is just dropped
            self._retired[entry.key] = RetiredEntry(entry.recipe, entry.cache_key, entry.footprint,
                                                    weakref.ref(entry.value))

    def _evict(self, victims: list[CacheEntry], defer: bool) -> list[str]:
        for entry in victims:
            if defer:
                self._releasing[entry.key] = self._entries.pop(entry.key)
            else:
                self._remove(entry.key)
        self.evictions += len(victims)
        return [e.cache_key for e in victims]

    def evict(self, name: str, defer: bool = False) -> list[str]:
        """Drop the entries whose cache key, key or file name is ``name``; returns their cache keys."""
        with self._lock:
            return self._evict(self.find(name), defer)

    def clear(self, include_pinned: bool = False, defer: bool = False) -> list[str]:
        with self._lock:
            return self._evict([e for e in self._entries.values() if include_pinned or not e.pinned], defer)

    def release_deferred(self) -> list[str]:
        """Let go of entries evicted with ``defer`` (call on ComfyUI's executing thread): "release"
        always means dropping the last reference, on that thread; "evict" taking an entry out."""
        with self._lock:
            released = list(self._releasing.values())
            self._releasing.clear()
            for entry in released:
                self._retire(entry)
        cache_keys = [e.cache_key for e in released]
        del released  # the last references, dropped here, on the caller's thread
        return cache_keys

    def evict_unpinned(self, enough: Callable[[], bool], keep: Callable[[CacheEntry], bool] = lambda e: False,
                       ) -> list[str]:
        """Evict unpinned entries (not ``keep``) now, least recently used first, asking ``enough()``
        after each one (executing thread: the last reference goes here). The caller has already found
        that memory is short. Returns their cache keys."""
        evicted = []
        with self._lock:
            candidates = sorted((e for e in self._entries.values() if not e.pinned and not keep(e)),
                                key=lambda e: e.last_used)
        while candidates:
            entry = candidates.pop(0)  # no reference is left behind here, so ``enough`` sees it freed
            with self._lock:
                if self._entries.get(entry.key) is entry:
                    self._remove(entry.key)
                    self.evictions += 1
                    evicted.append(entry.cache_key)
            del entry
            if enough():
                break
        return evicted

    # --- inspection -----------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """RAM held by cached entries (the budgeted quantity)."""
        with self._lock:
            return sum(e.footprint.ram for e in self._entries.values())

    def serve_stale(self, recipe: LoadRecipe | None, reason: str, *, cache_key: str | None = None, pinned: bool = False,
                    use_token: object = None) -> LoadOutcome | None:
        """The copy of an earlier version of ``recipe``'s files (same lineage), when loading the
        current version failed, or the copy cached under ``cache_key`` when its file is gone: it is
        marked stale with ``reason`` and handed out (a file being rewritten or removed must not
        take a served model away). None when there is no such copy."""
        with self._lock:
            def earlier(e: CacheEntry) -> bool:
                if recipe is None:
                    return e.cache_key == cache_key
                return e.recipe.lineage == recipe.lineage and e.key != recipe.key

            older = [e for e in self._entries.values() if earlier(e)]
            if not older:
                return None
            entry = max(older, key=lambda e: e.seq)
            entry.stale = reason
            self._hit(entry, pinned, use_token)
            return LoadOutcome(entry.value, entry, hit=True)

    def snapshot(self) -> CacheSnapshot:
        """Everything status reports, read under one hold of the lock (see ``CacheSnapshot``)."""
        with self._lock:
            return CacheSnapshot(
                entries=[dataclasses.replace(e) for e in self._entries.values()],
                loading=self.loading(), releasing=[dataclasses.replace(e) for e in self._releasing.values()],
                retired=self.retired(), reserved_bytes=self.reserved_bytes(), budget_bytes=self.budget_bytes,
                refuse_over_budget=self.refuse_over_budget, loads=self.loads, evictions=self.evictions,
                readoptions=self.readoptions)

    def reserved_bytes(self) -> int:
        with self._lock:
            return sum(f.reserved for f in self._flights.values())

    def entries(self) -> list[CacheEntry]:
        with self._lock:
            return list(self._entries.values())

    def retired(self) -> list[RetiredEntry]:
        """Evicted entries still alive elsewhere; dead ones are forgotten here."""
        with self._lock:
            for key in [k for k, r in self._retired.items() if r.ref() is None]:
                del self._retired[key]
            return list(self._retired.values())

    def loading(self) -> list[tuple[str, int]]:
        """Loads in flight: (cache key, number of requests waiting for it)."""
        with self._lock:
            return [(f.cache_key, f.waiters) for f in self._flights.values()]

    def releasing(self) -> list[CacheEntry]:
        """Evicted entries held until the executing thread releases them."""
        with self._lock:
            return list(self._releasing.values())

    def find(self, name: str) -> list[CacheEntry]:
        """Entries named ``name`` by cache key, key, or the file name of one of their files."""
        with self._lock:
            exact = [e for e in self._entries.values() if name in (e.cache_key, e.key)]
            if exact:
                return exact
            return [e for e in self._entries.values()
                    if any(p == name or p.endswith(("/" + name, "\\" + name)) for p in e.recipe.paths)]
