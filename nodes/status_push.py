"""Live cache status for the page: ``memkit.status`` messages over ComfyUI's websocket.

The panel (``web/memkit_panel.js``) shows what ``GET /memkit/status`` answers; this module sends
the same payload to every connected page whenever it changes, so the panel follows preloads,
loads and evictions without polling:

* ``notify()`` (any thread): something changed, send soon. It listens to the service
  (``MemKitService.changed``: loads, hits, evictions, clears, pins, releases, and every transition
  of the preload, which ``PreloadState`` reports itself); /free calls it after it drops conditionings.
  The step cache's registry (``step_cache.report``) calls it too when a run starts and when it
  ends, so the panel shows a finished run's report (and its memory back to 0) at once.
* A watcher thread also measures the cache again (``ModelCache.remeasure``, never on the event
  loop) and builds the status once per ``POLL_SECONDS`` while a page is connected, sending it
  when it differs from the last one sent: that catches what nothing notifies (ComfyUI moving
  weights to the GPU). With no page connected it still measures every few seconds.
* At most one message per ``MIN_GAP_SECONDS``: notifications that arrive meanwhile are merged
  into the next message, which always carries the latest state.

``PromptServer.send_sync`` hands the message to the server's event loop with
``loop.call_soon_threadsafe``, so it may be called from this thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from ..model_cache.bounded import cut
from ..model_cache.service import get_service
from ..model_cache.status import build_status

log = logging.getLogger("memkit.push")

EVENT = "memkit.status"
POLL_SECONDS = 1.0
MIN_GAP_SECONDS = 0.25
REMEASURE_IDLE_POLLS = 5  # with no page connected, footprints are measured again every 5 polls


class StatusPusher:
    """Sends ``memkit.status`` to the connected pages when the status changes (one watcher thread)."""

    def __init__(self, server: Any, poll_seconds: float = POLL_SECONDS, min_gap_seconds: float = MIN_GAP_SECONDS
                 ) -> None:
        self._server = server
        self._poll = poll_seconds
        self._gap = min_gap_seconds
        self._wake = threading.Event()
        self._last: str | None = None
        self._thread = threading.Thread(target=self._run, name="memkit-status-push", daemon=True)

    def start(self) -> StatusPusher:
        self._thread.start()
        return self

    def notify(self) -> None:
        self._wake.set()

    def _clients(self) -> bool:
        return bool(getattr(self._server, "sockets", None))

    def _run(self) -> None:
        idle_polls = 0
        while True:
            notified = self._wake.wait(self._poll)
            self._wake.clear()
            idle_polls += 1
            if self._clients() or notified or idle_polls >= REMEASURE_IDLE_POLLS:
                idle_polls = 0
                try:  # here, off the event loop: /memkit/status only reads what was measured
                    get_service().cache.remeasure()
                except Exception as error:
                    log.debug("[memkit] measuring the cache failed: %s", error)
            if not self._clients():
                self._last = None  # a page that connects later fetches /memkit/status itself
                continue
            try:
                self.push(force=notified)
            except Exception as error:  # the watcher must outlive any one bad status
                log.warning("[memkit] could not send the cache status to the page: %s: %s",
                            type(error).__name__, error)
            time.sleep(self._gap)

    def push(self, force: bool = False) -> bool:
        """Send the status if it changed since the last message (or ``force``); True when sent."""
        payload = build_status(get_service())
        text = json.dumps({k: v for k, v in payload.items() if k != "time"}, sort_keys=True, default=str)
        if not force and text == self._last:
            return False
        self._last = text
        self._server.send_sync(EVENT, payload)
        return True


_pusher: StatusPusher | None = None


def install(server: Any) -> StatusPusher:
    """Start the watcher for this server (once)."""
    global _pusher
    if _pusher is None:
        _pusher = StatusPusher(server).start()
    service = get_service()
    if notify not in service.listeners:
        service.listeners.append(notify)  # loads, hits, evictions: pushed at once, not at the next poll
    try:
        from ..step_cache import report as step_cache_report
    except Exception as error:  # the cache's status is pushed without the step cache
        log.warning("[memkit] step cache runs will not be pushed to the page: %s: %s", type(error).__name__,
                    cut(str(error), 300))
    else:
        step_cache_report.add_listener(notify)  # a step cache run started or ended
    return _pusher


def notify() -> None:
    """Something changed: send the status to the page soon (a no-op without a server)."""
    if _pusher is not None:
        _pusher.notify()
