"""Nodes that show what the MemKit cache holds."""

from __future__ import annotations

import time
from typing import Any

from comfy_api.latest import io, ui

from ..model_cache import comfy_models
from ..model_cache.service import get_service
from ..model_cache.status import build_status

CATEGORY = "memkit/cache"
COLUMNS = ("cache_key", "kind", "file", "options", "RAM MB", "shared MB", "VRAM MB", "device", "hits", "uses",
           "load s", "pinned", "uncloned", "state")


def _row(entry: dict[str, Any]) -> tuple[str, ...]:
    files = ", ".join(f.rsplit("/", 1)[-1] for f in entry.get("files", [])) or "-"
    options = ", ".join(f"{k}={v}" for k, v in entry.get("options", {}).items()) or "-"
    def megabytes(field: str) -> str:
        return f"{entry[field] / 2**20:.1f}" if field in entry else "-"

    return (entry["cache_key"], entry.get("kind", "-"), files, options, megabytes("ram_bytes"),
            megabytes("shared_bytes"), megabytes("vram_bytes"),
            entry.get("device", "-"), str(entry.get("hits", "-")), str(entry.get("uses", "-")),
            str(entry.get("load_seconds", "-")), str(entry.get("pinned", "-")),
            ", ".join(entry.get("uncloned", [])) or "-",
            entry["state"] + (f": {entry['error']}" if "error" in entry else ""))


def format_table(status: dict[str, Any]) -> str:
    """A plain-text table of the cache, readable on a node and in logs."""
    rows = [COLUMNS, *(_row(e) for e in status["entries"])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    totals, preload = status["totals"], status["preload"]
    budget = totals["budget_bytes"]
    lines.append("")
    lines.append(f"{totals['entries']} cached, {totals['ram_bytes'] / 2**30:.2f} GB RAM"
                 + (f" of {budget / 2**30:.1f} GB budget" if budget else "")
                 + (f" ({totals['over_budget_bytes'] / 2**30:.2f} GB over it: pinned entries, or one larger than it)"
                    if totals.get("over_budget_bytes") else "")
                 + (f", {totals['mapped_bytes'] / 2**30:.2f} GB mapped from files"
                    if totals.get("mapped_bytes") else "")
                 + (f", {totals['shared_bytes'] / 2**30:.2f} GB shared weights" if totals.get("shared_bytes") else "")
                 + f", {totals['vram_bytes'] / 2**30:.2f} GB VRAM"
                 + (f", {totals['evicted_held_ram_bytes'] / 2**30:.2f} GB held by evicted entries"
                    if totals["evicted_held_ram_bytes"] else "")
                 + f"; loads {totals['loads']}, evictions {totals['evictions']}; preload {preload['mode']}: "
                 + f"{preload['done']}/{preload['total']} done, {preload['failed']} failed"
                 + (f", {preload['stale']} stale" if preload.get("stale") else "") + f" ({preload['state']})")
    c = status["conditioning"]
    lines.append(f"conditioning cache: {c['ram_entries']} in RAM ({c['ram_bytes'] / 2**20:.1f} MB), {c['disk_files']} "
                 f"on disk ({c['disk_bytes'] / 2**20:.1f} MB); hits {c['ram_hits']} RAM, {c['disk_hits']} disk; "
                 f"misses {c['misses']}")
    return "\n".join(lines)


class MemKitCacheInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemKitCacheInfo",
            display_name="Cache Info (MemKit)",
            category=CATEGORY,
            description="A table of every model in the MemKit cache: key, kind, file, options, size, device, "
                        "hits, load time, pinned, state. Shown on the node and returned as text.",
            inputs=[],
            outputs=[io.String.Output(display_name="table")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls) -> float:
        return time.time()  # the cache changes between prompts; always re-read it

    @classmethod
    def execute(cls) -> io.NodeOutput:
        table = format_table(build_status(get_service()))
        return io.NodeOutput(table, ui=ui.PreviewText(table))


class MemKitCacheStatus(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemKitCacheStatus",
            display_name="Cache Status (MemKit)",
            category=CATEGORY,
            description="Whether a model (by cache key or file name) is in the MemKit cache, with details.",
            inputs=[io.String.Input("name", default="", tooltip="A cache key (e.g. checkpoint:sd15.safetensors) "
                                                                "or a model file name.")],
            outputs=[io.Boolean.Output(display_name="is_cached"), io.String.Output(display_name="detail")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, name: str) -> float:
        return time.time()

    @classmethod
    def execute(cls, name: str) -> io.NodeOutput:
        service = get_service()
        found = service.cache.find(name.strip())
        if found:
            detail = "\n".join(f"{e.cache_key}: {'stale (' + e.stale + '), ' if e.stale else ''}{e.recipe.kind.value}, "
                               f"{e.footprint.ram / 2**20:.1f} MB RAM, "
                               f"{e.footprint.vram / 2**20:.1f} MB VRAM on {comfy_models.devices(e.value)}, "
                               f"{e.hits} hits, {e.uses} uses, loaded in {e.load_seconds:.2f} s, "
                               f"{'pinned' if e.pinned else 'unpinned'}" for e in found)
        elif name.strip() in (cache_key for cache_key, _ in service.cache.loading()):
            detail = f"{name}: loading"
        elif name.strip() in (failures := service.preload.snapshot().failures):
            detail = f"{name}: failed: {failures[name.strip()]}"
        else:
            detail = f"{name!r} is not cached"
        return io.NodeOutput(bool(found), detail, ui=ui.PreviewText(detail))


NODES = [MemKitCacheInfo, MemKitCacheStatus]
