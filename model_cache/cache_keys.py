"""Cache keys: the readable names that selectors offer and status shows.

One function names an entry (``default_cache_key``) and one registry remembers what a selector may
offer: the enabled config entries, then the models loaded successfully since start-up. A load
that failed is not offered (it would fail again); the registry is read by ``/object_info`` and
the nodes while the preload writes it, hence the lock.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from .config import PreloadEntry
from .recipe import ModelKind


def default_cache_key(kind: ModelKind, names: list[str] | tuple[str, ...], options: dict[str, str]) -> str:
    """``kind:file[+file][opt=value,...]`` with the names as ComfyUI lists them; defaults left out.
    A node load reads ``node:NodeId(input=value,...)``."""
    if kind is ModelKind.NODE:
        inputs = json.loads(options.get("inputs", "{}"))
        return f"node:{options.get('node', '?')}(" + ",".join(f"{k}={v}" for k, v in sorted(inputs.items())) + ")"
    shown = [f"{k}={v}" for k, v in sorted(options.items()) if v not in ("default", "")]
    return f"{kind.value}:{'+'.join(names)}" + (f"[{','.join(shown)}]" if shown else "")


def entry_cache_key(entry: PreloadEntry) -> str:
    return entry.cache_key or default_cache_key(entry.kind, entry.file_names(), entry.load_options())


@dataclass(frozen=True)
class KnownLoad:
    """How to load what a cache key names."""

    names: tuple[str, ...]
    options: tuple[tuple[str, str], ...]
    pinned: bool


class UnknownCacheKeyError(ValueError):
    """A selector was given a cache key that names nothing."""


class CacheKeyRegistry:
    """The cache keys a selector can offer, per kind; thread-safe."""

    def __init__(self, configured: list[PreloadEntry]) -> None:
        self._lock = threading.Lock()
        self._configured: dict[tuple[ModelKind, str], KnownLoad] = {
            (e.kind, entry_cache_key(e)): KnownLoad(tuple(e.file_names()), tuple(sorted(e.load_options().items())),
                                                e.pinned)
            for e in configured
        }
        self._loaded: dict[tuple[ModelKind, str], KnownLoad] = {}

    def cache_key_for(self, kind: ModelKind, names: list[str], options: dict[str, str]) -> str:
        """The configured cache key when a config entry describes this load, else a readable name."""
        wanted = (tuple(names), tuple(sorted(options.items())))
        for (entry_kind, cache_key), known in self._configured.items():
            if entry_kind is kind and (known.names, known.options) == wanted:
                return cache_key
        return default_cache_key(kind, names, options)

    def remember(self, kind: ModelKind, cache_key: str, names: list[str], options: dict[str, str]) -> None:
        """A successful load: offer its key from now on."""
        if (kind, cache_key) in self._configured:
            return
        with self._lock:
            self._loaded[(kind, cache_key)] = KnownLoad(tuple(names), tuple(sorted(options.items())), False)

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
