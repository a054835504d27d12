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
from ..model_cache.service import MemKitService

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


def queue_prompt(prompt: dict[str, Any], wait_seconds: float = SERVER_WAIT_SECONDS) -> str:
    """POST a prompt to this ComfyUI's /prompt, waiting for the server to listen; returns its id."""
    deadline = time.monotonic() + wait_seconds
    body = json.dumps({"prompt": prompt, "client_id": CLIENT_ID}).encode()
    context = ssl._create_unverified_context()  # our own server on loopback
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        url = _server_url()
        if url is not None:
            request = urllib.request.Request(url + "/prompt", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30, context=context) as response:
                    return json.loads(response.read())["prompt_id"]
            except urllib.error.HTTPError as error:  # the server answered: no point in retrying
                raise RuntimeError(f"POST /prompt answered {error.code}: {error.read()[:500]!r}") from None
            except OSError as error:  # not listening yet
                last_error = error
        time.sleep(0.25)
    raise RuntimeError(f"ComfyUI's server did not accept a prompt within {wait_seconds:.0f} s ({last_error})")


def preload_prompt(aliases: list[str], run_id: str) -> dict[str, Any]:
    return {"1": {"class_type": PRELOAD_NODE, "inputs": {"cache_keys": "\n".join(aliases), "run_id": run_id}}}


def start_background_preload(service: MemKitService, entries: list[PreloadEntry]) -> bool:
    """Read the entries' files on a thread, then queue their build; False if a preload runs already."""
    run_id = uuid.uuid4().hex
    if not service.preload.begin(len(entries), "reading", run_id=run_id):
        return False
    queue_preload(service, entries, run_id, read_files=True)
    return True


def queue_preload(service: MemKitService, entries: list[PreloadEntry], run_id: str, *, read_files: bool) -> None:
    """On a thread: optionally read the files ahead, then queue the ``MemKitPreload`` prompt of run ``run_id``."""

    def run() -> None:
        aliases = [entry_alias(e) for e in entries]
        if read_files:
            for entry in entries:
                try:
                    warm_page_cache(service.recipe(entry.kind, entry.file_names(), entry.load_options()).paths)
                except Exception as error:  # the build reports it, naming the entry
                    log.debug("[memkit] reading %s ahead failed: %s", entry_alias(entry), error)
        service.preload.set_phase("queued")
        try:
            queue_prompt(preload_prompt(aliases, run_id))
        except Exception as error:
            reason = (f"not preloaded: could not queue the preload on ComfyUI's queue ({error}); "
                      "it loads when a prompt first uses it")
            log.error("[memkit] %s", reason)
            for alias in aliases:
                service.preload.entry_done(alias, reason)
            service.preload.finish()

    threading.Thread(target=run, name="memkit-preload", daemon=True).start()
