"""The one process-wide MemKit service: config + cache + preloading, as nodes and routes see it."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from . import comfy_models
from .config import HostChoices, PreloadConfig, PreloadEntry, load_config, locate_config
from .manager import LoadOutcome, ModelCache
from .recipe import FileIdentityReader, LoadRecipe, ModelKind

log = logging.getLogger("memkit")

DEFAULT_BUDGET_FRACTION = 0.6


class ModelNotFoundError(FileNotFoundError):
    """A model name that is not a file in ComfyUI's model folders."""


class ModelLoadError(RuntimeError):
    """ComfyUI could not load a model file (corrupt, truncated, not a model it knows)."""


def host_choices() -> HostChoices:
    return HostChoices(clip_types=comfy_models.clip_types(), weight_dtypes=comfy_models.weight_dtypes(),
                       devices=comfy_models.clip_devices())


def default_alias(kind: ModelKind, names: list[str], options: dict[str, str]) -> str:
    shown = [f"{k}={v}" for k, v in sorted(options.items()) if v not in ("default", "")]
    return f"{kind.value}:{'+'.join(names)}" + (f"[{','.join(shown)}]" if shown else "")


def entry_alias(entry: PreloadEntry) -> str:
    return entry.cache_key or default_alias(entry.kind, entry.file_names(), entry.load_options())


@dataclass
class PreloadState:
    """What /memkit/ready and the status node report about start-up preloading."""

    mode: str = "off"
    running: bool = False
    total: int = 0
    done: int = 0
    started: float | None = None
    finished: float | None = None
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return not self.running


class MemKitService:
    """Owns the cache; loads through it; preloads the config; answers status questions."""

    def __init__(self, config: PreloadConfig) -> None:
        self.config = config
        settings = config.settings
        budget = (int(settings.ram_budget_gb * 2**30) if settings.ram_budget_gb
                  else int(psutil.virtual_memory().total * DEFAULT_BUDGET_FRACTION))
        self.cache = ModelCache(measure=comfy_models.tensor_bytes, budget_bytes=budget)
        self.identities = FileIdentityReader(hash_contents=settings.hash_contents)
        self.preload = PreloadState(mode=settings.preload_mode)
        self._preload_lock = threading.Lock()
        self._requested: dict[tuple[ModelKind, str], tuple[tuple[str, ...], tuple[tuple[str, str], ...]]] = {}

    # --- loading --------------------------------------------------------------------------

    def recipe(self, kind: ModelKind, names: list[str], options: dict[str, str]) -> LoadRecipe:
        paths = []
        for name in names:
            path = comfy_models.resolve(kind, name)
            if path is None:
                folder = comfy_models.FOLDERS[kind]
                raise ModelNotFoundError(f"{kind.value} {name!r} is not a file in ComfyUI's '{folder}' model folders")
            paths.append(path)
        return LoadRecipe.build(kind, paths, options, self.identities)

    def request(self, kind: ModelKind, names: list[str], options: dict[str, str] | None = None, *,
                alias: str | None = None, pinned: bool = False, progress: Any = None) -> LoadOutcome:
        """The cached value for these files and options, loading it through ComfyUI on a miss."""
        options = options or {}
        recipe = self.recipe(kind, names, options)
        alias = alias or self._alias_for(kind, names, options)
        self._requested[(kind, alias)] = (tuple(names), tuple(sorted(options.items())))

        def load() -> Any:
            try:
                value = comfy_models.load(kind, names, options)
            except Exception as error:
                files = ", ".join(recipe.paths)
                raise ModelLoadError(f"could not load {kind.value} from {files}: {error}") from error
            if value is None or (isinstance(value, tuple) and value[0] is None):
                raise ModelLoadError(f"could not detect the model type of {', '.join(recipe.paths)}")
            if self.config.settings.auto_gpu_load:
                comfy_models.load_to_gpu(value)
            return value

        outcome = self.cache.get_or_load(recipe, load, alias=alias, pinned=pinned)
        outcome.entry.device = comfy_models.device_of(outcome.value)
        if self.config.settings.verbose:
            log.info("[memkit] %s %s", "hit" if outcome.hit else "loaded", alias)
        if progress is not None:
            progress.update(1)
        return outcome

    def _alias_for(self, kind: ModelKind, names: list[str], options: dict[str, str]) -> str:
        """A configured cache_key when a config entry describes this load, else a readable name."""
        for entry in self.config.enabled_entries():
            if entry.kind is kind and entry.file_names() == names and entry.load_options() == options:
                return entry_alias(entry)
        return default_alias(kind, names, options)

    def checkout(self, kind: ModelKind, names: list[str], options: dict[str, str] | None = None,
                 progress: Any = None) -> Any:
        """What a loader node returns: a clone of the cached value."""
        return comfy_models.clone(self.request(kind, names, options, progress=progress).value)

    def checkout_alias(self, kind: ModelKind, alias: str, progress: Any = None) -> Any:
        """What a selector returns for a cache key; loads a known entry that is not cached (yet)."""
        known = self.known_requests(kind)
        if alias not in known:
            raise KeyError(f"no {kind.value} entry named {alias!r}; available: {', '.join(sorted(known)) or 'none'}")
        names, options, pinned = known[alias]
        value = self.request(kind, names, options, alias=alias, pinned=pinned, progress=progress).value
        self.preload.failures.pop(alias, None)
        return comfy_models.clone(value)

    def known_requests(self, kind: ModelKind) -> dict[str, tuple[list[str], dict[str, str], bool]]:
        """Cache keys a selector can offer: the config's entries, then whatever was loaded since."""
        known = {alias: (list(names), dict(options), False)
                 for (k, alias), (names, options) in self._requested.items() if k is kind}
        for alias, entry in self.configured(kind).items():
            known[alias] = (entry.file_names(), entry.load_options(), entry.pinned)
        return known

    def configured(self, kind: ModelKind) -> dict[str, PreloadEntry]:
        return {entry_alias(e): e for e in self.config.enabled_entries() if e.kind is kind}

    def fingerprint(self, kind: ModelKind, names: list[str], options: dict[str, str] | None = None) -> str:
        """Changes when a file changes on disk, so ComfyUI's output cache re-runs the loader."""
        try:
            return self.recipe(kind, names, options or {}).key
        except (ModelNotFoundError, OSError) as error:
            return f"missing:{error}"

    # --- preloading -----------------------------------------------------------------------

    def start_preload(self, entries: list[PreloadEntry] | None = None, blocking: bool | None = None) -> bool:
        """Preload entries in order; returns False when a preload is already running."""
        entries = self.config.enabled_entries() if entries is None else entries
        with self._preload_lock:
            if self.preload.running:
                return False
            self.preload = PreloadState(mode=self.preload.mode, running=True, total=len(entries),
                                        started=time.time())
        blocking = self.config.settings.preload_mode == "blocking" if blocking is None else blocking
        if blocking:
            self._preload_all(entries)
        else:
            threading.Thread(target=self._preload_all, args=(entries,), name="memkit-preload", daemon=True).start()
        return True

    def _preload_all(self, entries: list[PreloadEntry]) -> None:
        state = self.preload
        log.info("[memkit] preloading %d model(s) from %s", len(entries), self.config.path)
        for entry in entries:
            alias = entry_alias(entry)
            try:
                self.request(entry.kind, entry.file_names(), entry.load_options(), alias=alias, pinned=entry.pinned)
            except Exception as error:  # one bad entry must not stop the others
                state.failures[alias] = str(error)
                log.error("[memkit] %s: preloading %s failed: %s", self.config.path, alias, error)
            state.done += 1
        state.finished = time.time()
        state.running = False
        log.info("[memkit] preload finished: %d ok, %d failed, %.1f s", state.done - len(state.failures),
                 len(state.failures), state.finished - (state.started or state.finished))

    # --- reporting ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        entries = [
            {
                "cache_key": e.alias, "kind": e.recipe.kind.value, "key": e.key,
                "files": list(e.recipe.paths), "options": dict(e.recipe.options), "bytes": e.nbytes,
                "device": e.device, "hits": e.hits, "load_seconds": round(e.load_seconds, 3),
                "pinned": e.pinned, "state": "ready",
            }
            for e in self.cache.entries()
        ]
        entries += [{"cache_key": alias, "state": "loading"} for alias in self.cache.loading()]
        entries += [{"cache_key": alias, "state": "failed", "error": error}
                    for alias, error in self.preload.failures.items()]
        return {
            "entries": entries,
            "totals": {"entries": len(self.cache.entries()), "bytes": self.cache.used_bytes,
                       "budget_bytes": self.cache.budget_bytes, "loads": self.cache.loads,
                       "evictions": self.cache.evictions},
            "preload": {"mode": self.preload.mode, "ready": self.preload.ready, "total": self.preload.total,
                        "done": self.preload.done, "failed": len(self.preload.failures)},
            "config": {"path": str(self.config.path) if self.config.path else None,
                       "problems": list(self.config.problems)},
        }


_service: MemKitService | None = None
_service_lock = threading.Lock()


def get_service() -> MemKitService:
    """The process-wide service, created from the located config on first use."""
    global _service
    with _service_lock:
        if _service is None:
            path = locate_config(comfy_models.user_directory())
            _service = MemKitService(load_config(path, host_choices()))
        return _service


def reset_service(config: PreloadConfig | None = None) -> MemKitService:
    """Replace the service (tests; a config reload). The old cache's entries are dropped."""
    global _service
    with _service_lock:
        if config is None:
            path = locate_config(comfy_models.user_directory())
            config = load_config(path, host_choices())
        _service = MemKitService(config)
        return _service
