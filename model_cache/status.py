"""The cache as ``/memkit/status`` and the info nodes report it: a plain JSON-able snapshot."""

from __future__ import annotations

from typing import Any

from . import comfy_models
from .cache import Footprint, RetiredEntry
from .recipe import LoadRecipe
from .service import MemKitService


def _describe(alias: str, recipe: LoadRecipe, footprint: Footprint, state: str) -> dict[str, Any]:
    return {"cache_key": alias, "kind": recipe.kind.value, "key": recipe.key, "files": list(recipe.paths),
            "ram_bytes": footprint.ram, "vram_bytes": footprint.vram, "state": state}


def _measure_now(retired: RetiredEntry) -> Footprint:
    value = retired.ref()
    return comfy_models.footprint(value) if value is not None else Footprint()


def build_status(service: MemKitService) -> dict[str, Any]:
    """Every entry (ready, loading, evicted but still held, failed), totals and preload progress.

    ``ram_bytes`` and ``vram_bytes`` are measured now (ComfyUI moves weights between devices);
    only RAM counts against ``budget_bytes``. ``evicted_held_ram_bytes`` is memory of evicted
    entries that a prompt or ComfyUI's output cache still holds: it is freed when they let go.
    """
    cache = service.cache
    total = cache.footprint()
    entries: list[dict[str, Any]] = [
        {**_describe(e.alias, e.recipe, e.footprint, "ready"), "options": dict(e.recipe.options),
         "bytes": e.footprint.ram, "device": comfy_models.devices(e.value), "hits": e.hits, "uses": e.uses,
         "load_seconds": round(e.load_seconds, 3), "pinned": e.pinned,
         "shared": comfy_models.shared_parts(e.value)}
        for e in cache.entries()
    ]
    entries += [{"cache_key": alias, "state": "loading", "waiting": waiting} for alias, waiting in cache.loading()]
    entries += [_describe(e.alias, e.recipe, e.footprint, "releasing") for e in cache.releasing()]
    held = [(r, _measure_now(r)) for r in cache.retired()]
    entries += [_describe(r.alias, r.recipe, fp, "evicted-held") for r, fp in held]
    preload = service.preload.snapshot()
    entries += [{"cache_key": alias, "state": "failed", "error": error} for alias, error in preload.failures.items()]
    return {
        "entries": entries,
        "totals": {"entries": len(cache.entries()), "bytes": total.ram, "ram_bytes": total.ram,
                   "vram_bytes": total.vram, "reserved_bytes": cache.reserved_bytes(),
                   "budget_bytes": cache.budget_bytes,
                   "evicted_held_ram_bytes": sum(fp.ram for _, fp in held),
                   "loads": cache.loads, "evictions": cache.evictions, "readoptions": cache.readoptions},
        "preload": {"mode": preload.mode, "phase": preload.phase, "state": preload.state, "ready": preload.ready,
                    "total": preload.total, "done": preload.done, "failed": len(preload.failures),
                    "warmup_error": preload.warmup_error},
        "conditioning": service.conditioning.report(),
        "config": {"path": str(service.config.path) if service.config.path else None,
                   "problems": list(service.config.problems)},
    }
