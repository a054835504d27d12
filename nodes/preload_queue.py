"""MemKit's preload and warm-up, with the models built on ComfyUI's executing thread.

A background thread may read files (``warm_page_cache``) but must not call ComfyUI's loaders or
model management beside a running prompt. So the background preload ends by queueing a prompt
with one ``MemKitPreload`` node on this very server (``loopback_queue``): ComfyUI runs it between
the user's prompts, with its progress bar and its interrupt. The warm-up workflow is queued
behind it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from ..model_cache.bounded import cut
from ..model_cache.cache_keys import entry_cache_key
from ..model_cache.config import PreloadEntry
from ..model_cache.preload import warm_page_cache
from ..model_cache.recipe import ModelKind
from ..model_cache.service import MemKitService
from .loopback_queue import prompt_error, queue_prompt, queue_wait_seconds

log = logging.getLogger("memkit.preload")

PRELOAD_NODE = "MemKitPreload"


def start_preload(service: MemKitService) -> None:
    """The start-up preload as configured, then the warm-up workflow if there is one.

    ``blocking`` loads here, before ComfyUI starts its prompt worker (so nothing runs beside it)
    and returns when done; ``background`` reads files on a thread and queues the build on
    ComfyUI's queue. GPU placement and the warm-up always run on the executing thread, as prompts.
    """
    settings, warmup = service.config.settings, service.config.warmup_prompt
    entries = service.config.enabled_entries() if settings.preload_mode != "off" else []
    if not entries and warmup is None:
        return
    run_id = uuid.uuid4().hex
    if settings.preload_mode == "background" and entries:
        service.preload.begin([entry_cache_key(e) for e in entries], "reading", run_id=run_id,
                              warmup=warmup is not None)
        queue_preload(service, entries, run_id, read_files=True, warmup=warmup)
        return
    service.preload.begin([entry_cache_key(e) for e in entries], "loading", run_id=run_id, warmup=warmup is not None)
    # Other loader nodes run arbitrary code (and may come from packs ComfyUI loads after this one):
    # they are always built on the executing thread, by the queued prompt.
    core = [e for e in entries if e.kind is not ModelKind.NODE]
    failures = service.preload_entries(core, executing_thread=False)
    to_place = [e for e in core if entry_cache_key(e) not in failures] if settings.auto_gpu_load else []
    to_queue = to_place + [e for e in entries if e.kind is ModelKind.NODE]
    if to_queue or warmup is not None:
        queue_preload(service, to_queue, run_id, read_files=False, warmup=warmup)  # on the executing thread
    else:
        service.preload.finish(run_id)


def preload_prompt(run_id: str) -> dict[str, Any]:
    """The prompt of a run: its cache keys stay with the run (``PreloadState.queued``), as a list."""
    return {"1": {"class_type": PRELOAD_NODE, "inputs": {"cache_keys": "", "run_id": run_id}}}


def start_background_preload(service: MemKitService, entries: list[PreloadEntry]) -> bool:
    """Read the entries' files on a thread, then queue their build; False if a preload runs already."""
    run_id = uuid.uuid4().hex
    if not service.preload.begin([entry_cache_key(e) for e in entries], "reading", run_id=run_id):
        return False
    queue_preload(service, entries, run_id, read_files=True)
    return True


def queue_preload(service: MemKitService, entries: list[PreloadEntry], run_id: str, *, read_files: bool,
                  warmup: dict[str, Any] | None = None) -> None:
    """On a thread: optionally read the files ahead, queue the ``MemKitPreload`` prompt of run
    ``run_id`` (when there are entries) and wait for it, then run the warm-up workflow.

    The run always ends with an outcome for every key: if the prompt fails before its node
    reports, is removed from the queue, is refused or waits past the deadline, ``finish`` marks
    what it did not report as failed, with the reason.
    """
    def run() -> None:
        keys = [entry_cache_key(e) for e in entries]
        if read_files:
            for entry in entries:
                try:
                    recipe = service.recipe(entry.load())
                    if not service.builds_from_store(recipe):  # a build from the store reads no model file
                        warm_page_cache(recipe.paths)
                except Exception as error:  # the build reports it, naming the entry
                    log.debug("[memkit] reading %s ahead failed: %s", entry_cache_key(entry), error)
        if keys:
            service.preload.queue(run_id, keys)
            service.preload.set_phase("queued", run_id)
            try:
                error = prompt_error(queue_prompt(preload_prompt(run_id)), queue_wait_seconds(service))
            except Exception as failure:
                error = f"it could not be put on ComfyUI's queue: {cut(str(failure), 600)}"
            reason = f"the preload prompt did not run: {error}; it loads when a prompt first uses it"
            if service.preload.finish(run_id, reason):  # its node never reported (refused, removed, failed early)
                log.error("[memkit] %s", reason)
        else:
            service.preload.finish(run_id)
        if warmup is not None:
            run_warmup(service, warmup)

    threading.Thread(target=run, name="memkit-preload", daemon=True).start()


def run_warmup(service: MemKitService, workflow: dict[str, Any]) -> None:
    """Queue the warm-up workflow behind the preload (ComfyUI's queue is first in, first out) and
    wait for it: /memkit/ready turns 200 when it has run."""
    try:
        error = prompt_error(queue_prompt(workflow), queue_wait_seconds(service))
    except Exception as failure:
        error = cut(str(failure), 600)
    if error is not None:
        log.error("[memkit] %s: the warm-up workflow failed: %s", service.config.settings.warmup_workflow, error)
    else:
        log.info("[memkit] warm-up workflow done")
    service.preload.warmup_finished(error)
