"""Queue the release of evicted models, so their memory is freed without waiting for a prompt.

An eviction off ComfyUI's executing thread (a route, ComfyUI's /free) only takes the entries out
of the cache; letting go of them touches ComfyUI's model management, so ``MemKitReleaseEvicted``
does it on the executing thread, queued here.
"""

from __future__ import annotations

import logging
import threading

from ..model_cache.service import MemKitService
from .loopback_queue import prompt_error, queue_prompt, queue_wait_seconds

log = logging.getLogger("memkit.preload")

_release_queued = threading.Event()


def queue_release(service: MemKitService) -> None:
    """After an eviction off the executing thread: queue one ``MemKitReleaseEvicted`` prompt (at most
    one waits at a time) so the memory is freed without waiting for the next prompt."""
    if not service.cache.releasing() or _release_queued.is_set():
        return
    _release_queued.set()

    def run() -> None:
        try:
            error = prompt_error(queue_prompt({"1": {"class_type": "MemKitReleaseEvicted", "inputs": {}}}),
                                 queue_wait_seconds(service))
            if error is not None:
                _release_queued.clear()
                log.warning("[memkit] releasing evicted models: %s; they are released with the next prompt", error)
        except Exception as failure:
            _release_queued.clear()
            log.warning("[memkit] could not queue the release of evicted models (%s); they are released with "
                        "the next prompt", failure)

    threading.Thread(target=run, name="memkit-release", daemon=True).start()


def release_started() -> None:
    """Called by ``MemKitReleaseEvicted`` as it starts: from now on an eviction queues a new release.

    Cleared here, not once the prompt is queued: the prompt can run before ``queue_prompt``
    returns, and an eviction in between would otherwise wait for the next prompt."""
    _release_queued.clear()
