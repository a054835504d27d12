"""MemKitPreload: load preload_config.json entries now, on ComfyUI's executing thread.

MemKit queues this node itself to finish a start-up preload (``nodes.preload_queue``); users can
also put it in a workflow (e.g. first in a warm-up workflow) to load entries by cache key.
"""

from __future__ import annotations

import time

import comfy.utils
from comfy_api.latest import io, ui

from ..model_cache.bounded import cut
from ..model_cache.service import get_service
from .release_queue import release_started


def parse_keys(text: str) -> list[str] | None:
    """One cache key per line (a key may hold commas, never a line break); repeats count once;
    None (every enabled entry) when empty."""
    keys = [line.strip() for line in text.splitlines() if line.strip()]
    return list(dict.fromkeys(keys)) or None


def _stopped(error: BaseException) -> str:
    if type(error).__name__ == "InterruptProcessingException":  # comfy.model_management's, raised by /interrupt
        return "interrupted (/interrupt) before it was loaded; it loads when a prompt first uses it"
    return f"the preload node stopped before loading it ({type(error).__name__}: {cut(str(error), 300)})"


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
                                tooltip="Cache keys of enabled preload_config.json entries, one per line (a key "
                                        "may contain commas). Empty: every enabled entry."),
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
        keys = service.preload.queued(run_id) if run_id else parse_keys(cache_keys)
        if run_id and keys is None:  # its run was ended meanwhile (deadline, a restart of the queue)
            summary = "this preload run has ended already; nothing loaded"
            return io.NodeOutput(summary, ui=ui.PreviewText(summary))
        reason = None
        try:  # whatever happens, the run this prompt belongs to ends with an outcome for every key
            if run_id:
                service.preload.set_phase("loading", run_id)
            service.release_evicted()
            entries = service.entries_for(keys)
            bar = comfy.utils.ProgressBar(max(1, len(entries)))
            # the entry is reported (by the service) before the bar moves: its update may raise /interrupt
            failures = service.preload_entries(entries, executing_thread=True, on_entry=lambda *_: bar.update(1))
        except BaseException as error:
            reason = _stopped(error)
            raise
        finally:
            if run_id:
                service.preload.finish(run_id, reason)
        lines = [f"{cache_key}: failed: {error}" for cache_key, error in failures.items()]
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
