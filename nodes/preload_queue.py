"""Put MemKit's preload on ComfyUI's own queue, so the models are built on the executing thread.

A background thread may read files (``warm_page_cache``) but must not call ComfyUI's loaders or
model management beside a running prompt. So the background preload ends by queueing a prompt
with one ``MemKitPreload`` node through ComfyUI's public ``POST /prompt`` on this very server:
ComfyUI runs it between the user's prompts, with its progress bar and its interrupt.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from ..model_cache.aliases import entry_alias
from ..model_cache.config import PreloadEntry
from ..model_cache.preload import warm_page_cache
from ..model_cache.recipe import ModelKind
from ..model_cache.service import MemKitService
from . import status_push

log = logging.getLogger("memkit.preload")

PRELOAD_NODE = "MemKitPreload"
SERVER_WAIT_SECONDS = 600.0
CLIENT_ID = "memkit-preload"


def _server_url() -> str | None:
    """The address ComfyUI listens on, once it listens; a wildcard address is asked on loopback."""
    try:
        from comfy.cli_args import args
        from server import PromptServer
    except ImportError:
        return None
    server = getattr(PromptServer, "instance", None)
    address, port = getattr(server, "address", None), getattr(server, "port", None)
    if server is None or port is None or address is None:
        return None
    address = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(address, address)
    host = f"[{address}]" if ":" in address else address
    scheme = "https" if getattr(args, "tls_keyfile", None) and getattr(args, "tls_certfile", None) else "http"
    return f"{scheme}://{host}:{port}"


# our own server on loopback: never through an HTTP proxy from the environment, no certificate check
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                      urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))


def _call(method: str, path: str, body: Any = None, wait_seconds: float = SERVER_WAIT_SECONDS) -> Any:
    """One JSON request to this ComfyUI, waiting for it to listen; an HTTP error is final."""
    deadline = time.monotonic() + wait_seconds
    data = json.dumps(body).encode() if body is not None else None
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        url = _server_url()
        if url is not None:
            request = urllib.request.Request(url + path, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                with _OPENER.open(request, timeout=30) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:  # the server answered: no point in retrying
                raise RuntimeError(f"{method} {path} answered {error.code}: {error.read()[:500]!r}") from None
            except OSError as error:  # not listening yet
                last_error = error
        time.sleep(0.25)
    raise RuntimeError(f"ComfyUI's server did not answer {method} {path} within {wait_seconds:.0f} s ({last_error})")


def queue_prompt(prompt: dict[str, Any], wait_seconds: float = SERVER_WAIT_SECONDS) -> str:
    """POST a prompt to this ComfyUI's /prompt (its own queue); returns the prompt id."""
    return _call("POST", "/prompt", {"prompt": prompt, "client_id": CLIENT_ID}, wait_seconds)["prompt_id"]


def _outcome(item: dict[str, Any]) -> str | None:
    status = item.get("status", {})
    if status.get("status_str") == "success":
        return None
    errors = [m[1] for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
    reason = "; ".join(f"{e.get('node_type', '?')}: {e.get('exception_message', 'interrupted').strip()}"
                       for e in errors)
    return reason or f"ended with status {status.get('status_str')!r}"


def prompt_error(prompt_id: str) -> str | None:
    """Wait for a queued prompt to end; None when it succeeded, else why not (its error, or that
    it was removed from the queue before it ran)."""
    while True:
        item = _call("GET", f"/history/{prompt_id}").get(prompt_id)
        if item is not None:
            return _outcome(item)
        queue = _call("GET", "/queue")
        queued = {entry[1] for entry in queue.get("queue_running", []) + queue.get("queue_pending", [])}
        if prompt_id not in queued:
            item = _call("GET", f"/history/{prompt_id}").get(prompt_id)  # it may have just ended
            return _outcome(item) if item is not None else "removed from ComfyUI's queue before it ran"
        time.sleep(0.2)


def preload_prompt(aliases: list[str], run_id: str) -> dict[str, Any]:
    return {"1": {"class_type": PRELOAD_NODE, "inputs": {"cache_keys": "\n".join(aliases), "run_id": run_id}}}


def start_background_preload(service: MemKitService, entries: list[PreloadEntry]) -> bool:
    """Read the entries' files on a thread, then queue their build; False if a preload runs already."""
    run_id = uuid.uuid4().hex
    if not service.preload.begin(len(entries), "reading", run_id=run_id):
        return False
    queue_preload(service, entries, run_id, read_files=True)
    return True


def queue_preload(service: MemKitService, entries: list[PreloadEntry], run_id: str, *, read_files: bool,
                  warmup: dict[str, Any] | None = None) -> None:
    """On a thread: optionally read the files ahead, queue the ``MemKitPreload`` prompt of run
    ``run_id`` (when there are entries) and wait for it, then run the warm-up workflow.

    The run always ends: if the preload prompt fails before its node reports, or is removed from
    the queue, the entries it did not report are marked failed with the reason.
    """
    already_loaded = not read_files  # a blocking preload: the prompt only places the models

    def run() -> None:
        aliases = [entry_alias(e) for e in entries]
        if read_files:
            for entry in entries:
                try:
                    warm_page_cache(service.recipe(entry.kind, entry.file_names(), entry.load_options()).paths)
                except Exception as error:  # the build reports it, naming the entry
                    log.debug("[memkit] reading %s ahead failed: %s", entry_alias(entry), error)
        if aliases:
            service.preload.set_phase("queued")
            status_push.notify()
            try:
                error = prompt_error(queue_prompt(preload_prompt(aliases, run_id)))
            except Exception as failure:
                error = f"could not queue it on ComfyUI's queue ({failure})"
            if service.preload.owns(run_id):  # the node never reported (removed, refused, failed early)
                log.error("[memkit] the preload prompt did not run (%s); its entries load when a prompt first "
                          "uses them", error)
                done = service.preload.snapshot()
                for entry, alias in zip(entries, aliases):
                    built = already_loaded and entry.kind is not ModelKind.NODE  # loaded before ComfyUI ran
                    what = "loaded, but not placed on the device" if built else "not preloaded"
                    if alias not in done.failures:
                        service.preload.entry_done(alias, f"{what}: the preload prompt did not run ({error}); it "
                                                          "loads when a prompt first uses it")
                service.preload.finish()
        else:
            service.preload.finish()
        status_push.notify()
        if warmup is not None:
            run_warmup(service, warmup)
            status_push.notify()

    threading.Thread(target=run, name="memkit-preload", daemon=True).start()


_release_queued = threading.Event()


def queue_release(service: MemKitService) -> None:
    """After an eviction off the executing thread: queue one ``MemKitReleaseEvicted`` prompt (at most
    one waits at a time) so the memory is freed without waiting for the next prompt."""
    if not service.cache.releasing() or _release_queued.is_set():
        return
    _release_queued.set()

    def run() -> None:
        try:
            error = prompt_error(queue_prompt({"1": {"class_type": "MemKitReleaseEvicted", "inputs": {}}}))
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


def run_warmup(service: MemKitService, workflow: dict[str, Any]) -> None:
    """Queue the warm-up workflow behind the preload (ComfyUI's queue is first in, first out) and
    wait for it: /memkit/ready turns 200 when it has run."""
    try:
        error = prompt_error(queue_prompt(workflow))
    except Exception as failure:
        error = str(failure)
    if error is not None:
        log.error("[memkit] %s: the warm-up workflow failed: %s", service.config.settings.warmup_workflow, error)
    else:
        log.info("[memkit] warm-up workflow done")
    service.preload.warmup_finished(error)
