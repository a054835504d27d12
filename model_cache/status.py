"""The cache as ``/memkit/status``, the panel and the info nodes report it: one row per cache key.

One source for every reader. Nothing here measures tensors: footprints are measured at load,
before eviction decisions and by ``ModelCache.remeasure`` off the server's event loop, so
building the status is cheap and never blocks the routes.

A key's row takes the most telling of its records: a cached copy (``ready``, or ``stale`` when
its file changed and the reload failed, or when its latest load failed), else ``loading``,
``releasing``, ``evicted-held`` (evicted, still held by a prompt or ComfyUI's output cache),
``failed``. Totals are the sums of the ready and stale rows.

The step cache's recent runs are reported beside the cache (``step_cache``). That section is
read through a guarded import: if the step cache cannot be imported or its registry fails, the
section says so and the rest of the status is still served.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from . import comfy_models
from .bounded import cut
from .cache import CacheEntry, CacheSnapshot, Footprint
from .cache_keys import entry_cache_key
from .loads import shown_options
from .recipe import LoadRecipe
from .service import MemKitService

log = logging.getLogger("memkit")

STEP_CACHE_RUNS = 8  # runs listed in /memkit/status (each a small dict; the registry keeps a few more)


def _describe(cache_key: str, recipe: LoadRecipe, footprint: Footprint, state: str) -> dict[str, Any]:
    return {"cache_key": cache_key, "kind": recipe.kind.value, "key": recipe.key, "files": list(recipe.paths),
            "ram_bytes": footprint.ram, "mapped_bytes": footprint.mapped, "shared_bytes": footprint.shared,
            "vram_bytes": footprint.vram, "state": state}


def sharing_row(service: MemKitService, entry: CacheEntry) -> dict[str, Any] | None:
    """How a cached entry holds its weights when the shared weight store is on: ``mapped`` (built
    from the store), ``mapped-after-load`` (built from its file, then pointed at the store's copy),
    ``written`` (built from its file, then written and mapped), ``lost`` (some
    weights became private: moved to the GPU and back, or written in place) or ``private`` with
    the reason; and
    how many processes map its store file (None where that cannot be known)."""
    sharing = getattr(entry.value, "sharing", None)
    if service.sharing is None or sharing is None:
        return None
    state, reason = sharing.state, sharing.reason
    if state in ("mapped", "mapped-after-load", "written") and entry.footprint.shared < sharing.nbytes:
        moved = sharing.nbytes - entry.footprint.shared
        state, reason = "lost", (f"{moved / 2**20:.0f} MB of its weights are this process's own now (moved off the "
                                 "shared mapping, e.g. to the GPU and back, or written in place)")
    return {"state": state, "reason": reason, "processes": service.sharing.processes(sharing)}


def sharing_status(service: MemKitService) -> dict[str, Any]:
    """The shared weight store: on or off (and why), where, its cap and what its files take."""
    if service.sharing is None:
        return {"enabled": False, "reason": service.sharing_off}
    store = service.sharing.store
    try:
        used = store.used_bytes()
    except OSError:
        used = None
    return {"enabled": True, "directory": str(store.directory), "cap_bytes": store.max_bytes, "used_bytes": used}


def _cached_row(entry: CacheEntry, failure: str | None, over_budget: int) -> dict[str, Any]:
    reason = entry.stale or failure
    row = {**_describe(entry.cache_key, entry.recipe, entry.footprint, "stale" if reason else "ready"),
           "options": shown_options(entry.recipe.kind, entry.recipe.call), "device": comfy_models.devices(entry.value),
           "hits": entry.hits, "uses": entry.uses, "load_seconds": round(entry.load_seconds, 3), "pinned": entry.pinned,
           "uncloned": comfy_models.uncloned_parts(entry.value)}
    if reason:
        row["error"] = reason
    if over_budget and entry.pinned:
        row["over_budget"] = True
    return row


def status_rows(service: MemKitService, snapshot: CacheSnapshot | None = None) -> list[dict[str, Any]]:
    """One row per cache key (cached entries in load order, then the others), from one
    ``snapshot`` of the cache (taken now when not given)."""
    snapshot = snapshot or service.cache.snapshot()
    failures = service.preload.snapshot().failures
    over = snapshot.over_budget_bytes
    rows: dict[str, dict[str, Any]] = {}
    for entry in sorted(snapshot.entries, key=lambda e: e.seq):
        row = _cached_row(entry, failures.get(entry.cache_key), over)
        sharing = sharing_row(service, entry)
        if sharing is not None:
            row["sharing"] = sharing
        if entry.cache_key in rows:  # two versions under one key (a file changed while it loaded): one row
            row["copies"] = rows[entry.cache_key].get("copies", 1) + 1
            for field in ("ram_bytes", "mapped_bytes", "shared_bytes", "vram_bytes"):
                row[field] += rows[entry.cache_key][field]
        rows[entry.cache_key] = row
    for cache_key, waiting in snapshot.loading:
        rows.setdefault(cache_key, {"cache_key": cache_key, "state": "loading", "waiting": waiting})
    for entry in snapshot.releasing:
        rows.setdefault(entry.cache_key, _describe(entry.cache_key, entry.recipe, entry.footprint, "releasing"))
    for retired in snapshot.retired:
        rows.setdefault(retired.cache_key,
                        _describe(retired.cache_key, retired.recipe, retired.footprint, "evicted-held"))
    for cache_key, error in failures.items():
        rows.setdefault(cache_key, {"cache_key": cache_key, "state": "failed", "error": error})
    return list(rows.values())


def readiness(service: MemKitService, snapshot: CacheSnapshot | None = None) -> dict[str, Any]:
    """What ``/memkit/ready`` answers. ``ready``: every preload entry has an outcome and the
    warm-up ran; its state is ``degraded`` when an entry failed or is stale, the warm-up failed
    or the run went wrong as a whole."""
    state = service.preload.snapshot()
    entries = (snapshot or service.cache.snapshot()).entries
    stale = sorted(e.cache_key for e in entries if e.stale)
    name = "degraded" if state.state == "ready" and stale else state.state
    return {"ready": state.ready, "state": name, "mode": state.mode, "phase": state.phase, "done": state.done,
            "total": state.total, "failed": sorted(state.failures), "stale": stale,
            "warmup_error": state.warmup_error, "error": state.error}


def step_cache_status() -> dict[str, Any]:
    """The step cache's last ``STEP_CACHE_RUNS`` runs (oldest first; runs in progress last, state
    ``running``) and the bytes the runs in progress hold now, per device (``held_bytes``; empty
    when none runs). Never raises: a step cache that cannot report gives ``error`` instead."""
    try:
        from ..step_cache import report

        runs = report.last_runs()
        live = [run for run in runs if run.get("state") == "running"]
        held: dict[str, int] = {}
        for run in live:
            for use in run.get("devices", {}).values():
                held[use["device"]] = held.get(use["device"], 0) + use["bytes"]
    except Exception as error:  # the cache's status must be served without the step cache
        log.debug("[memkit] step cache status unavailable: %s", error)
        return {"runs": [], "running": 0, "held_bytes": {}, "held_total_bytes": 0,
                "error": f"{type(error).__name__}: {cut(str(error), 200)}"}
    return {"runs": runs[-STEP_CACHE_RUNS:], "running": len(live), "held_bytes": held,
            "held_total_bytes": sum(held.values())}


def configured_entries(service: MemKitService) -> list[dict[str, Any]]:
    """The enabled config entries, in config order: what the panel can preload one by one."""
    return [{"cache_key": entry_cache_key(e), "kind": e.kind.value, "files": e.file_names(), "pinned": e.pinned,
             "description": e.description} for e in service.config.enabled_entries()]


def build_status(service: MemKitService) -> dict[str, Any]:
    """``/memkit/status``, the panel's ``memkit.status`` messages and the info nodes: every key's row,
    totals, preload progress, the conditioning cache, the step cache, the config's problems, the
    configured entries, and when it was taken (``time``, seconds since the epoch: the page keeps
    the newest of what the route and the messages bring).

    ``ram_bytes`` is private RAM (what the budget counts), ``mapped_bytes`` RAM mapped from the
    model files, ``shared_bytes`` RAM of the shared weight store's files, which every process maps
    (its own cap counts it; ``shared_weights`` describes the store), ``vram_bytes`` accelerator
    memory. ``over_budget_bytes``: how far pinned entries hold the cache over its budget.
    ``evicted_held_ram_bytes``: memory of evicted entries that a prompt or ComfyUI's output cache
    still holds, freed when they let go. ``step_cache``: see ``step_cache_status``.
    """
    taken = time.time()
    cache = service.cache.snapshot()  # rows and totals from one instant: they agree with each other
    rows = status_rows(service, cache)
    total = cache.footprint
    held = [row for row in rows if row["state"] == "evicted-held"]
    ready = readiness(service, cache)
    return {
        "entries": rows,
        "totals": {"entries": len(cache.entries), "ram_bytes": total.ram, "mapped_bytes": total.mapped,
                   "shared_bytes": total.shared, "vram_bytes": total.vram, "reserved_bytes": cache.reserved_bytes,
                   "budget_bytes": cache.budget_bytes, "over_budget_bytes": cache.over_budget_bytes,
                   "refuse_over_budget": cache.refuse_over_budget,
                   "evicted_held_ram_bytes": sum(row["ram_bytes"] for row in held),
                   "loads": cache.loads, "evictions": cache.evictions, "readoptions": cache.readoptions},
        "preload": {**{k: ready[k] for k in ("mode", "phase", "state", "ready", "total", "done", "warmup_error",
                                              "error")},
                    "failed": len(ready["failed"]), "stale": len(ready["stale"])},
        "conditioning": service.conditioning.report(),
        "shared_weights": sharing_status(service),
        "step_cache": step_cache_status(),
        "config": {"path": str(service.config.path) if service.config.path else None,
                   "problems": list(service.config.problems)},
        "configured": configured_entries(service),
        "time": taken,
    }
