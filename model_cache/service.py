"""The one process-wide MemKit service: the config, the cache, the cache keys and the preload state.

Nodes and routes reach everything through ``get_service()``. Loading goes through ``request``;
which thread may do what is decided here (see ``model_cache.preload`` for the thread rule):
callers on ComfyUI's executing thread say so, and only they place models on a device or honour
ComfyUI's interrupt. The nodes' entry points (``checkout``, ``checkout_by_cache_key``, ``fingerprint``,
``encode_by_name``) run there and do a node's whole turn: they read the running prompt from
ComfyUI, free what is due, then hand out.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

from . import comfy_models
from .bounded import cut, listed
from .cache import CacheLoadError, LoadOutcome, LoadWaitInterruptedError, ModelCache
from .cache_keys import CacheKeyRegistry, entry_cache_key
from .conditioning import Conditioning, ConditioningCache, conditioning_key
from .config import HostChoices, PreloadConfig, PreloadEntry, load_config, locate_config
from .loads import Load
from .node_inputs import NodeInputsError, check_node_inputs
from .preload import PreloadState
from .recipe import FileIdentityReader, LoadRecipe, ModelKind, NodeCall
from .weight_sharing import WeightSharing, is_stale
from .weight_store import StoreError, WeightStore, default_directory, unavailable_reason

log = logging.getLogger("memkit")

DEFAULT_BUDGET_FRACTION = 0.6
RAM_PRESSURE_HYSTERESIS = 1.1  # as ComfyUI's RAM-pressure cache: release until 10% above the headroom


class ModelNotFoundError(FileNotFoundError):
    """A model name that is not a file in ComfyUI's model folders."""


class ModelLoadError(RuntimeError):
    """ComfyUI could not load a model file (corrupt, truncated, not a model it knows)."""


class NodeLoadError(ValueError):
    """A node load that cannot be made: no such node, or inputs that do not fit its schema."""


def reclaim_memory() -> None:
    """Free what evicted models held, now: collect their reference cycles, then hand the C heap's
    free pages back to the system (glibc keeps freed blocks under 32 MB, most of a model's weights,
    in its arenas: RSS would stay up and the budget would only be kept on paper)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        return None


def host_choices() -> HostChoices:
    return HostChoices(clip_types=comfy_models.clip_types(), weight_dtypes=comfy_models.weight_dtypes(),
                       devices=comfy_models.clip_devices())


class MemKitService:
    """Owns the cache; loads through it; preloads the config."""

    def __init__(self, config: PreloadConfig) -> None:
        self.config = config
        settings = config.settings
        self.sharing, self.sharing_off = _weight_sharing(settings.shared_weights)
        budget = (int(settings.ram_budget_gb * 2**30) if settings.ram_budget_gb
                  else int(psutil.virtual_memory().total * DEFAULT_BUDGET_FRACTION))
        self.cache = ModelCache(measure=comfy_models.footprint, budget_bytes=budget,
                                estimate=self._load_peak_ram, refuse_over_budget=settings.refuse_over_budget,
                                reclaim=reclaim_memory)
        self.identities = FileIdentityReader(hash_contents=settings.hash_contents)
        self.cache_keys = CacheKeyRegistry(config.enabled_entries())
        self.listeners: list[Callable[[], None]] = []  # told when the cache changes (the page's live status)
        expected = bool(config.warmup_prompt) or (settings.preload_mode != "off" and bool(config.enabled_entries()))
        self.preload = PreloadState(mode=settings.preload_mode, expected=expected, on_change=self.changed)
        user = comfy_models.user_directory()
        self.conditioning = ConditioningCache(
            ram_bytes=int(settings.conditioning_ram_gb * 2**30),
            disk_dir=Path(user) / "memkit" / "conditioning" if user else None,
            disk_bytes=int(settings.conditioning_disk_gb * 2**30))

    # --- loading --------------------------------------------------------------------------

    def builds_from_store(self, recipe: LoadRecipe) -> bool:
        """Whether a load of the recipe will be built around the shared store's copy: it maps the
        store's file and reads no model file (nothing to read ahead, no RAM to reserve)."""
        return self.sharing is not None and self.sharing.expects_store_hit(recipe)

    def _load_peak_ram(self, recipe: LoadRecipe) -> int:
        """RAM a load takes at its peak (reserved under the budget)."""
        return 0 if self.builds_from_store(recipe) else comfy_models.load_peak_ram(recipe)

    def recipe(self, load: Load) -> LoadRecipe:
        """The load's node call and the identity of the files among its inputs. A kind's own loader
        names its files, looked up in the kind's folders (ModelNotFoundError when one is gone, so a
        copy already loaded can be served); a node called by id may be any node with any inputs, so
        they are checked against its schema (defaults filled in, as the page does) and its files are
        found among them."""
        if load.kind is not ModelKind.NODE:
            return LoadRecipe.build(load.kind, load.call, [self._path(load.kind, name) for name in load.files],
                                    self.identities)
        call = self._checked(load.call)
        return LoadRecipe.build(load.kind, call, comfy_models.node_model_files(call.kwargs()), self.identities)

    @staticmethod
    def _path(kind: ModelKind, name: str) -> str:
        path = comfy_models.resolve(kind, name)
        if path is None:
            raise ModelNotFoundError(f"{kind.value} {name!r} is not a file in ComfyUI's '{kind.folder}' model folders")
        return path

    @staticmethod
    def _checked(call: NodeCall) -> NodeCall:
        """The call with its inputs checked against the node's schema, defaults filled in. Raises
        NodeLoadError naming the node and every bad field."""
        try:
            inputs = check_node_inputs(call.node, comfy_models.node_input_types(call.node), call.kwargs())
        except (NodeInputsError, RuntimeError) as error:
            raise NodeLoadError(f"{call.node}: {error}") from None
        return NodeCall.of(call.node, inputs)

    def request(self, load: Load, *, cache_key: str | None = None, pinned: bool = False, use_token: object = None,
                executing_thread: bool = False) -> LoadOutcome:
        """The cached value of this load, loading it through ComfyUI on a miss.

        ``executing_thread``: the caller is ComfyUI's prompt worker, so a wait for another
        thread's load honours /interrupt and ``auto_gpu_load`` may place a new model.
        """
        cache_key = cache_key or self.cache_keys.cache_key_for(load)
        try:
            recipe = self.recipe(load)
        except (ModelNotFoundError, OSError) as gone:  # its file was removed (or cannot be read) meanwhile
            older = self.cache.serve_stale(None, cut(str(gone), 500), cache_key=cache_key, pinned=pinned,
                                           use_token=use_token)
            if older is None:
                raise
            log.warning("[memkit] %s: %s; serving the copy already loaded (status: stale)", cache_key,
                        cut(str(gone), 500))
            self.changed()
            return older

        def from_file() -> comfy_models.LoadedValue:
            try:  # the recipe's call: a node's inputs as checked (defaults filled in)
                value = comfy_models.load(recipe.call, recipe.kind.kept_outputs)
            except Exception as error:
                if comfy_models.is_interrupt(error):  # an Exception before ComfyUI 0.20: not a failed load
                    raise
                source = ", ".join(recipe.paths) or recipe.call.node
                raise ModelLoadError(f"could not load {recipe.kind.value} {cache_key} from {source}: {error}") \
                    from error
            if comfy_models.is_empty(value):
                raise ModelLoadError(f"could not detect the model type of {', '.join(recipe.paths) or cache_key}")
            return value

        def build() -> comfy_models.LoadedValue:
            if self.sharing is None:
                value = from_file()
            else:
                value = self.sharing.load(recipe, from_file,
                                          interrupted=comfy_models.interrupted if executing_thread else None)
            value.key = recipe.portable_key  # what its conditionings are keyed on, on disk too
            return value

        try:
            outcome = self.cache.get_or_load(recipe, build, cache_key=cache_key, pinned=pinned, use_token=use_token,
                                             interrupted=comfy_models.interrupted if executing_thread else None)
        except LoadWaitInterruptedError as stopped:
            log.warning("[memkit] interrupted: %s", stopped)
            comfy_models.raise_interrupt()
        except (ModelLoadError, CacheLoadError) as failed:
            # the file changed on disk and the new version does not load (truncated, half copied):
            # keep serving the copy we have, shown as stale with the reason, rather than failing prompts
            older = self.cache.serve_stale(recipe, cut(str(failed), 500), pinned=pinned, use_token=use_token)
            if older is None:
                raise
            log.warning("[memkit] %s: %s; serving the copy loaded before the file changed (status: stale)",
                        cache_key, cut(str(failed), 500))
            self.changed()
            return older
        self.cache_keys.remember(cache_key, load)
        self.preload.clear_failure(cache_key)  # a successful load clears a failure, wherever it happened
        if executing_thread and not outcome.hit and self.config.settings.auto_gpu_load:
            comfy_models.place_on_device(outcome.value)
        if self.config.settings.verbose:
            log.info("[memkit] %s %s", "hit" if outcome.hit else "loaded", cache_key)
        self.changed()
        return outcome

    def changed(self) -> None:
        """Tell the listeners (cheap, any thread: they only note that something changed)."""
        for listener in list(self.listeners):
            try:
                listener()
            except Exception as error:  # a listener never breaks a load
                log.debug("[memkit] a status listener failed: %s", error)

    # --- what the nodes call (ComfyUI's executing thread) ---------------------------------

    @contextlib.contextmanager
    def _node_turn(self) -> Iterator[object]:
        """Around a node handing out a model or a conditioning: first let go of what was evicted
        from other threads and release under ComfyUI's RAM pressure (never what this prompt uses),
        so the memory is free before anything loads; yields the prompt's token (its uses of an
        entry count once); the node's progress bar fills when it has its value."""
        token = comfy_models.prompt_token()
        self.release_evicted()
        self.relieve_ram_pressure(comfy_models.ram_headroom_gb(), token)
        bar = comfy_models.progress_bar(1)
        yield token
        bar.update(1)

    def checkout(self, load: Load) -> tuple[Any, ...]:
        """What a loader node returns: clones of the cached parts (loaded on a miss)."""
        with self._node_turn() as token:
            return self._clones(load, token)

    def _clones(self, load: Load, token: object) -> tuple[Any, ...]:
        outcome = self.request(load, use_token=token, executing_thread=True)
        return comfy_models.clone(outcome.value)

    def checkout_by_cache_key(self, kind: ModelKind, cache_key: str) -> tuple[Any, ...]:
        """What a selector returns for a cache key; loads a known entry that is not cached (yet)."""
        with self._node_turn() as token:
            known = self.cache_keys.lookup(kind, cache_key)
            outcome = self.request(known.load, cache_key=cache_key, pinned=known.pinned, use_token=token,
                                   executing_thread=True)
            return comfy_models.clone(outcome.value)

    def fingerprint(self, load: Load) -> str:
        """The recipe key (it changes when a file changes on disk, so ComfyUI re-runs the loader).

        ComfyUI asks for it once per prompt even when its own output cache answers the node, so
        this is also where a prompt's use of the entry is counted for the LRU, and where models
        evicted from other threads are let go of when the node itself does not run.
        """
        self.release_evicted()
        try:
            key = self.recipe(load).key
        except (ModelNotFoundError, NodeLoadError, OSError) as error:
            return f"missing:{error}"
        self.cache.touch(key, comfy_models.prompt_token())
        return key

    def cache_key_fingerprint(self, kind: ModelKind, cache_key: str) -> str:
        known = self.cache_keys.known(kind).get(cache_key)
        if known is None:
            return f"unknown:{cache_key}"
        return self.fingerprint(known.load)

    # --- conditioning ---------------------------------------------------------------------

    def encode(self, clip: Any, text: str) -> Conditioning:
        """CLIPTextEncode's output for (this encoder, this text), from the conditioning cache when it
        has it (executing thread: a miss runs the encoder)."""
        identity = comfy_models.encoder_identity(clip)
        if identity is None:
            return comfy_models.encode_text(clip, text)
        name, stable = identity
        key = conditioning_key(name, text)
        found = self.conditioning.get(key, disk=stable)
        if found is not None:
            return found
        encoded = comfy_models.encode_text(clip, text)
        self.conditioning.put(key, encoded, disk=stable)
        return encoded

    def by_name_key(self, load: Load, text: str) -> tuple[str, str]:
        """The conditioning key of ``encode_by_name`` (reads the files' identity, loads nothing), and
        the device the encoder would load on."""
        recipe = self.recipe(load)
        device, dtype = comfy_models.text_encoder_placement(recipe.call.kwargs().get("device", "default"))
        identity = json.dumps(["by-name", recipe.portable_key, device, dtype, comfy_models.comfy_version()])
        return conditioning_key(identity, text), device

    def encode_by_name(self, load: Load, text: str) -> Conditioning:
        """CLIPTextEncode's output for the text encoder this load makes, without loading the
        encoder when the conditioning is cached (RAM or disk). Executing thread: a miss loads the
        encoder through the cache (and caches it), then encodes.

        The key is the encoder's recipe (files and their identity on disk, type, device option),
        the device and dtype ComfyUI would load it with, ComfyUI's version and the exact text.
        """
        with self._node_turn() as token:
            key, device = self.by_name_key(load, text)
            found = self.conditioning.get(key, disk=True)
            if found is not None:
                return found
            clip = self._clones(load, token)[0]
            encoded = comfy_models.encode_text(clip, text)
            # on disk only when the encoder really is where it was predicted to be (else: RAM, this run)
            self.conditioning.put(key, encoded, disk=comfy_models.clip_load_device(clip) == device)
            return encoded

    # --- memory ---------------------------------------------------------------------------

    def evict(self, name: str, *, executing_thread: bool) -> list[str]:
        """Evict by cache key, key or file name. Off the executing thread the entries leave the cache
        now but are let go by ``release_evicted`` on the executing thread (see ``model_cache.cache``)."""
        evicted = self.cache.evict(name, defer=not executing_thread)
        self.changed()
        return evicted

    def set_pinned(self, name: str, pinned: bool) -> list[str]:
        """The user's pin (the page, /memkit/pin): see ``ModelCache.set_pinned``; tells the listeners."""
        changed = self.cache.set_pinned(name, pinned)
        if changed:
            self.changed()
        return changed

    def clear(self, include_pinned: bool, *, executing_thread: bool) -> list[str]:
        cleared = self.cache.clear(include_pinned, defer=not executing_thread)
        self.changed()
        return cleared

    def release_evicted(self) -> list[str]:
        """Executing thread only: let go of entries evicted from other threads."""
        released = self.cache.release_deferred()
        if released:
            reclaim_memory()
            log.info("[memkit] released %s", ", ".join(released))
            self.changed()
        return released

    def relieve_ram_pressure(self, headroom_gb: float, use_token: object = None) -> list[str]:
        """Under ComfyUI's RAM-pressure caching (``--cache-ram``), release unpinned entries as it
        releases its own outputs: only when free RAM is below the headroom even after a garbage
        collection, least recently used first, never what the running prompt (``use_token``) uses,
        until free RAM is 10% above the headroom. Executing thread only."""
        def available_gb() -> float:
            return psutil.virtual_memory().available / 2**30

        def enough() -> bool:
            reclaim_memory()  # what was released is freed only once nothing refers to it
            return available_gb() > headroom_gb * RAM_PRESSURE_HYSTERESIS

        if headroom_gb <= 0 or available_gb() > headroom_gb:
            return []
        gc.collect()
        if available_gb() > headroom_gb:
            return []
        released = self.cache.evict_unpinned(
            enough, keep=lambda e: use_token is not None and e.last_use_token == use_token)
        if released:
            log.info("[memkit] RAM below ComfyUI's %.1f GB headroom: released %s", headroom_gb, ", ".join(released))
            self.changed()
        return released

    # --- preloading -----------------------------------------------------------------------

    def entries_for(self, cache_keys: list[str] | None) -> list[PreloadEntry]:
        """Enabled config entries by cache key (all of them for None; repeats count once); unknown
        keys are a ValueError naming them (bounded)."""
        entries = self.config.enabled_entries()
        if cache_keys is None:
            return entries
        by_cache_key = {entry_cache_key(e): e for e in entries}
        wanted = list(dict.fromkeys(cache_keys))
        unknown = [a for a in wanted if a not in by_cache_key]
        if unknown:
            raise ValueError(f"unknown cache key(s) {listed(unknown)}; configured: {listed(by_cache_key) or 'none'}")
        return [by_cache_key[a] for a in wanted]

    def preload_entries(self, entries: list[PreloadEntry], *, executing_thread: bool,
                        on_entry: Callable[[str, str | None], None] | None = None) -> dict[str, str]:
        """Load entries in order on this thread; one failure never stops the others.

        On the executing thread with ``auto_gpu_load``, every entry is also placed on its device
        (entries loaded by a blocking preload are placed here, once ComfyUI runs).
        Returns the failures by cache key.
        """
        failures: dict[str, str] = {}
        for entry in entries:
            if executing_thread:
                comfy_models.raise_if_interrupted()  # /interrupt stops a long preload between entries
            cache_key = entry_cache_key(entry)
            error = None
            try:
                outcome = self.request(entry.load(), cache_key=cache_key, pinned=entry.pinned,
                                       executing_thread=executing_thread)
                if executing_thread and outcome.hit and self.config.settings.auto_gpu_load:
                    comfy_models.place_on_device(outcome.value)  # a miss was placed by request()
            except Exception as failure:  # one bad entry must not stop the others; /interrupt stops them all
                if comfy_models.is_interrupt(failure):
                    raise
                error = cut(str(failure), 1000)
                failures[cache_key] = error
                log.error("[memkit] %s: preloading %s failed: %s", self.config.path, cache_key, error)
            self.preload.entry_done(cache_key, error)  # before anything else can raise (the bar: /interrupt)
            if on_entry is not None:
                on_entry(cache_key, error)
        return failures


_service: MemKitService | None = None
_service_lock = threading.Lock()


def _weight_sharing(options: Any) -> tuple[WeightSharing | None, str | None]:
    """The shared weight store the settings ask for, or None and why not (logged once)."""
    if not options.enabled:
        return None, None
    directory = Path(options.directory) if options.directory else default_directory()
    cap = int(options.max_gb * 2**30) if options.max_gb else psutil.virtual_memory().total // 2
    store = WeightStore(directory, cap)
    reason = unavailable_reason(directory)
    if reason is None:
        try:
            store.prepare()
            store.sweep(is_stale)
        except (StoreError, OSError) as error:
            reason = str(error)
    if reason is not None:
        log.warning("[memkit] shared weights are off: %s; every cached model stays private to this process",
                    cut(reason, 300))
        return None, cut(reason, 300)
    log.info("[memkit] shared weights in %s (cap %.1f GB)", directory, cap / 2**30)
    return WeightSharing(store, wait_seconds=options.wait_minutes * 60, reclaim=reclaim_memory), None


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
