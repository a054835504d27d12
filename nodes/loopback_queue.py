"""Queue a prompt on this same ComfyUI and wait for it to end: MemKit's own prompts.

What must run on ComfyUI's executing thread (building preloaded models, releasing evicted ones,
the warm-up workflow) is put on ComfyUI's own queue through its public ``POST /prompt``, on the
address this server listens on; ComfyUI runs it between the user's prompts, with its progress
bar and its interrupt. The calls never go through a proxy or follow a redirect, and an answer
that is not ComfyUI's (an auth layer, a redirect, a TLS failure) raises ``LoopbackRefusedError``
at once: retrying cannot help.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import time
import urllib.error
import urllib.request
from typing import Any

from ..model_cache.bounded import cut, shown
from ..model_cache.service import MemKitService

SERVER_WAIT_SECONDS = 600.0
CLIENT_ID = "memkit-preload"
MAX_ANSWER_BYTES = 64 * 2**20  # /queue carries every queued prompt's body


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


class LoopbackRefusedError(RuntimeError):
    """This ComfyUI answered MemKit's own loopback call, but not as ComfyUI does (an auth layer, a
    redirect, TLS): retrying cannot help, and the message says what to do."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect (e.g. an auth proxy's login page) is reported, never followed: it may lead anywhere."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # urllib calls it so
        return None


# Our own server on loopback: never through an HTTP proxy from the environment, never following a
# redirect. Over TLS the certificate is ComfyUI's own (often self-signed), and the address is ours.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects(),
                                      urllib.request.HTTPSHandler(context=ssl._create_unverified_context()))
_AUTH_HINT = ("an authentication layer (a login node or a proxy) answers for ComfyUI: let requests from this "
              "machine's loopback address through to /prompt, /history and /queue, or MemKit cannot put its "
              "preload on ComfyUI's queue (entries then load when a prompt first uses them)")


def _call(method: str, path: str, body: Any = None, wait_seconds: float = SERVER_WAIT_SECONDS) -> Any:
    """One JSON request to this ComfyUI, waiting (up to ``wait_seconds``) for it to listen.

    An answer that is not ComfyUI's (401/403, a redirect, a page that is not JSON, a TLS failure)
    raises ``LoopbackRefusedError`` at once; another HTTP error raises RuntimeError."""
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
                    raw = response.read(MAX_ANSWER_BYTES)
            except urllib.error.HTTPError as error:  # the server answered: no point in retrying
                what = f"ComfyUI's {method} {path} on {url} answered {error.code}"
                if error.code in (401, 403, 407):
                    raise LoopbackRefusedError(f"{what}: {_AUTH_HINT}") from None
                if 300 <= error.code < 400:
                    where = shown(error.headers.get("Location", "?"), 120)
                    raise LoopbackRefusedError(f"{what} (a redirect to {where}, not followed): {_AUTH_HINT}") from None
                raise RuntimeError(f"{what}: {shown(error.read(500).decode('utf-8', 'replace'), 300)}") from None
            except urllib.error.URLError as error:
                if isinstance(error.reason, ssl.SSLError):
                    raise LoopbackRefusedError(f"TLS with ComfyUI's own server on {url} failed ({error.reason}); "
                                               "MemKit queues its preload through it") from None
                last_error = error  # not listening yet
            except OSError as error:
                last_error = error
            else:
                try:
                    return json.loads(raw)
                except ValueError:
                    raise LoopbackRefusedError(f"ComfyUI's {method} {path} on {url} answered with something that is "
                                               f"not JSON ({shown(raw[:80].decode('utf-8', 'replace'), 100)}): "
                                               f"{_AUTH_HINT}") from None
        time.sleep(0.25)
    raise RuntimeError(f"ComfyUI's server did not answer {method} {path} within {wait_seconds:.0f} s ({last_error})")


def queue_prompt(prompt: dict[str, Any], wait_seconds: float = SERVER_WAIT_SECONDS) -> str:
    """POST a prompt to this ComfyUI's /prompt (its own queue); returns the prompt id."""
    answer = _call("POST", "/prompt", {"prompt": prompt, "client_id": CLIENT_ID}, wait_seconds)
    if not isinstance(answer, dict) or not isinstance(answer.get("prompt_id"), str):
        raise LoopbackRefusedError(f"ComfyUI's POST /prompt answered without a prompt id ({shown(answer, 120)})")
    return answer["prompt_id"]


def _outcome(item: dict[str, Any]) -> str | None:
    status = item.get("status", {})
    if status.get("status_str") == "success":
        return None
    errors = [m[1] for m in status.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
    reason = "; ".join(f"{e.get('node_type', '?')}: {e.get('exception_message', 'interrupted').strip()}"
                       for e in errors)
    return cut(reason, 500) if reason else f"ended with status {status.get('status_str')!r}"


def queue_wait_seconds(service: MemKitService) -> float:
    """How long MemKit's own prompts may wait behind the user's (``settings.queue_wait_minutes``)."""
    return float(getattr(service.config.settings, "queue_wait_minutes", 360)) * 60


def prompt_error(prompt_id: str, wait_seconds: float = 6 * 3600) -> str | None:
    """Wait (at most ``wait_seconds``) for a queued prompt to end; None when it succeeded, else why not
    (its error, that it was removed from the queue before it ran, or that the wait ran out, in which
    case the prompt is taken off the queue if it has not started).

    Polls its own history entry (small) with a growing pause up to 2 s, and ComfyUI's whole
    ``/queue`` (every prompt's body) only every 5 s."""
    deadline = time.monotonic() + wait_seconds
    pause, next_queue_check = 0.1, time.monotonic() + 1.0
    while True:
        item = _call("GET", f"/history/{prompt_id}").get(prompt_id)
        if item is not None:
            return _outcome(item)
        now = time.monotonic()
        if now >= deadline:
            with contextlib.suppress(Exception):
                _call("POST", "/queue", {"delete": [prompt_id]}, wait_seconds=30)
            return (f"it was still waiting on ComfyUI's queue after {wait_seconds / 60:.0f} minutes "
                    "(settings.queue_wait_minutes)")
        if now >= next_queue_check:
            next_queue_check = now + 5.0
            queue = _call("GET", "/queue")
            queued = {entry[1] for entry in queue.get("queue_running", []) + queue.get("queue_pending", [])}
            if prompt_id not in queued:
                item = _call("GET", f"/history/{prompt_id}").get(prompt_id)  # it may have just ended
                return _outcome(item) if item is not None else "removed from ComfyUI's queue before it ran"
        time.sleep(min(pause, max(0.0, deadline - now)))
        pause = min(pause * 1.5, 2.0)
