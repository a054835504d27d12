"""Cache keys: the readable names that selectors offer and status shows.

A load comes with its default name (``Load.name``); a config entry's ``cache_key`` replaces it.
One registry remembers what a selector may offer: the enabled config entries, then the models
loaded successfully since start-up. A load that failed is not offered (it would fail again); the
registry is read by ``/object_info`` and the nodes while the preload writes it, hence the lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .config import PreloadEntry
from .loads import Load
from .recipe import ModelKind


def entry_cache_key(entry: PreloadEntry) -> str:
    return entry.cache_key or entry.load().name


@dataclass(frozen=True)
class KnownLoad:
    """How to load what a cache key names."""

    load: Load
    pinned: bool


class UnknownCacheKeyError(ValueError):
    """A selector was given a cache key that names nothing."""


class CacheKeyRegistry:
    """The cache keys a selector can offer, per kind; thread-safe."""

    def __init__(self, configured: list[PreloadEntry]) -> None:
        self._lock = threading.Lock()
        self._configured: dict[tuple[ModelKind, str], KnownLoad] = {
            (e.kind, entry_cache_key(e)): KnownLoad(e.load(), e.pinned) for e in configured
        }
        self._loaded: dict[tuple[ModelKind, str], KnownLoad] = {}

    def cache_key_for(self, load: Load) -> str:
        """The configured cache key when a config entry makes the same call, else the load's own name."""
        for (kind, cache_key), known in self._configured.items():
            if kind is load.kind and known.load.call == load.call:
                return cache_key
        return load.name

    def remember(self, cache_key: str, load: Load) -> None:
        """A successful load: offer its key from now on."""
        if (load.kind, cache_key) in self._configured:
            return
        with self._lock:
            self._loaded[(load.kind, cache_key)] = KnownLoad(load, False)

    def known(self, kind: ModelKind) -> dict[str, KnownLoad]:
        """Configured keys first (config order), then loaded ones; a snapshot, safe to iterate."""
        with self._lock:
            loaded = dict(self._loaded)
        known = {cache_key: k for (entry_kind, cache_key), k in self._configured.items() if entry_kind is kind}
        known.update({cache_key: k for (entry_kind, cache_key), k in loaded.items() if entry_kind is kind})
        return known

    def lookup(self, kind: ModelKind, cache_key: str) -> KnownLoad:
        known = self.known(kind)
        if cache_key not in known:
            offered = ", ".join(known) or "none (list models in preload_config.json or load one first)"
            raise UnknownCacheKeyError(f"There is no {kind.value.replace('_', ' ')} with cache key {cache_key!r}. "
                                       f"Cache keys that exist: {offered}.")
        return known[cache_key]
