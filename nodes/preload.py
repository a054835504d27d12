"""MemKitPreload: load preload_config.json entries now, on ComfyUI's executing thread.

MemKit queues this node itself to finish a start-up preload (``nodes.preload_queue``); users can
also put it in a workflow (e.g. first in a warm-up workflow) to load entries by cache key.
"""

from __future__ import annotations

import re
import time

import comfy.utils
from comfy_api.latest import io, ui

from ..model_cache.service import get_service
from . import status_push
from .preload_queue import release_started


def parse_keys(text: str) -> list[str] | None:
    """Cache keys separated by newlines or commas; None (every enabled entry) when empty."""
    keys = [k.strip() for k in re.split(r"[\n,]", text) if k.strip()]
    return keys or None


class MemKitPreload(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemKitPreload",
            display_name="Preload Models (MemKit)",
            category="memkit/cache",
            description="Loads preload_config.json entries into the MemKit cache now (and, with auto_gpu_load, "
                        "onto the GPU). MemKit queues this node itself after start-up; models are only ever "
                        "built on ComfyUI's executing thread, never beside a running prompt.",
            inputs=[
                io.String.Input("cache_keys", default="", multiline=True,
                                tooltip="Cache keys of enabled preload_config.json entries, one per line or "
                                        "comma-separated. Empty: every enabled entry."),
                io.String.Input("run_id", default="", optional=True,
                                tooltip="Set by MemKit's start-up preload so /memkit/ready follows this run; "
                                        "leave empty."),
            ],
            outputs=[io.String.Output(display_name="summary")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, cache_keys: str, run_id: str = "") -> float:
        return time.time()  # loading is the point: never answer from ComfyUI's output cache

    @classmethod
    def execute(cls, cache_keys: str, run_id: str = "") -> io.NodeOutput:
        service = get_service()
        owned = service.preload.owns(run_id)
        try:  # whatever happens, the run this prompt belongs to ends (/memkit/ready never sticks)
            if owned:
                service.preload.set_phase("loading")
                status_push.notify()
            service.release_evicted()
            entries = service.entries_for(parse_keys(cache_keys))
            bar = comfy.utils.ProgressBar(max(1, len(entries)))

            def on_entry(alias: str, error: str | None) -> None:
                bar.update(1)
                if owned:
                    service.preload.entry_done(alias, error)
                status_push.notify()  # the page's progress moves entry by entry

            failures = service.preload_entries(entries, executing_thread=True, on_entry=on_entry)
        finally:
            if owned:
                service.preload.finish()
            status_push.notify()
        lines = [f"{alias}: failed: {error}" for alias, error in failures.items()]
        summary = f"{len(entries) - len(failures)} of {len(entries)} entries loaded" + "".join(f"\n{x}" for x in lines)
        return io.NodeOutput(summary, ui=ui.PreviewText(summary))


class MemKitReleaseEvicted(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemKitReleaseEvicted",
            display_name="Release Evicted Models (MemKit)",
            category="memkit/cache",
            description="Frees the memory of models evicted through MemKit's HTTP routes or ComfyUI's /free. "
                        "Releasing a model changes ComfyUI's model management, so it happens on the executing "
                        "thread; MemKit queues this node itself after such an eviction.",
            inputs=[],
            outputs=[io.String.Output(display_name="released")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls) -> float:
        return time.time()

    @classmethod
    def execute(cls) -> io.NodeOutput:
        release_started()
        released = "\n".join(get_service().release_evicted()) or "nothing to release"  # it tells the page
        return io.NodeOutput(released, ui=ui.PreviewText(released))


NODES = [MemKitPreload, MemKitReleaseEvicted]
