"""HTTP routes under /memkit/ on ComfyUI's PromptServer, and the /free hook.

Bodies are JSON objects validated with pydantic: unknown keys, wrong types and names that leave
ComfyUI's model folders get a 400 with a message naming the field. Whatever a client sends, the
answer is a 4xx naming the problem, never a 5xx, and it quotes at most a few hundred characters of
the input (``model_cache.bounded``). The state-changing routes (POST preload, evict, clear, pin)
take only ``Content-Type: application/json`` and refuse pages of other origins (``route_guard``);
the GET routes change nothing and stay open to health checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..model_cache.bounded import cut, shown
from ..model_cache.config import check_model_name
from ..model_cache.service import MemKitService, get_service
from ..model_cache.status import build_status, readiness
from . import route_guard, status_push, template_thumbnails
from .preload_queue import start_background_preload
from .release_queue import queue_release

log = logging.getLogger("memkit.http")

MAX_BODY_BYTES = 64 * 1024  # our bodies are a few names or keys; ComfyUI's own limit is 100 MB
MAX_PROBLEMS = 10  # validation problems named in one answer
WAIT_POLL_SECONDS = 0.25
UTF8_NAMES = {"utf-8": "utf-8", "utf8": "utf-8", "us-ascii": "ascii", "ascii": "ascii"}  # JSON is UTF-8 (RFC 8259)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PreloadBody(_Body):
    cache_keys: list[str] | None = None
    wait: bool = False
    timeout_s: float = Field(600.0, gt=0, le=3600, allow_inf_nan=False)  # how long ``wait`` waits at most


class EvictBody(_Body):
    name: str

    @field_validator("name")
    @classmethod
    def _inside_model_folders(cls, value: str) -> str:
        return check_model_name(value)


class ClearBody(_Body):
    include_pinned: bool = False


class PinBody(EvictBody):
    pinned: bool


class _BadBodyError(Exception):
    """A body we answer with a 4xx; the message names the problem (bounded). ``broken``: aiohttp's
    parser failed on it (a bad gzip/deflate stream), so the rest of it can never be read."""

    def __init__(self, status: int, message: str, broken: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.broken = broken


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": cut(message)}, status=status)


def _bad_body_answer(request: web.Request, bad: _BadBodyError) -> web.Response:
    response = _error(bad.status, bad.args[0])
    if bad.broken:
        _end_broken_body(request, response)
    return response


def _end_broken_body(request: web.Request, response: web.StreamResponse) -> None:
    """After a parse failure aiohttp would read the rest of the body again once we answered (to keep
    the connection) and log the same failure as an unhandled exception with its traceback. The
    failure is answered: close the connection after the answer instead."""
    response.force_close()
    with contextlib.suppress(Exception):
        request.content.feed_eof()


async def _refusal(request: web.Request, why: route_guard.Refusal) -> web.Response:
    """The answer to a refused request; a small body is read (and dropped) first, so that a broken
    one is handled here rather than logged by aiohttp."""
    response = _error(why.status, why.reason)
    try:
        if request.body_exists:
            await _read_body(request)
    except _BadBodyError as bad:
        if bad.broken:
            _end_broken_body(request, response)
    except Exception as error:  # reading is a courtesy here: the answer stands
        log.debug("[memkit] reading a refused body failed: %s", type(error).__name__)
    return response


def _server_settings() -> tuple[list[str], str | None]:
    """ComfyUI's ``--listen`` addresses and ``--enable-cors-header`` (None when off), read per request
    (cheap) so that a test or a host that changes ``args`` is followed."""
    try:
        from comfy.cli_args import args
    except ImportError:  # outside ComfyUI: its default
        return ["127.0.0.1"], None
    listen = getattr(args, "listen", "127.0.0.1")
    return (listen.split(",") if isinstance(listen, str) else [""]), getattr(args, "enable_cors_header", None)


def _refused(request: web.Request, need_json: bool = True) -> route_guard.Refusal | None:
    listen, cors = _server_settings()
    why = route_guard.refusal(request.method, request.headers, listen, cors, need_json=need_json)
    if why is not None:
        log.warning("[memkit] refused %s %s (%d): %s", request.method, shown(request.path, 80), why.status, why.reason)
    return why


async def _read_body(request: web.Request) -> bytes:
    """The body, at most ``MAX_BODY_BYTES`` after decompression; a 413 beyond, a 400 when it cannot be read."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _BadBodyError(413, f"the body has {request.content_length} bytes; at most {MAX_BODY_BYTES} are accepted")
    body = bytearray()
    try:
        while chunk := await request.content.readany():
            body.extend(chunk)
            if len(body) > MAX_BODY_BYTES:
                raise _BadBodyError(413, f"the body has more than {MAX_BODY_BYTES} bytes (after any Content-Encoding)")
    except (web.RequestPayloadError, HttpProcessingError) as error:  # a broken gzip/deflate body, a short body
        reason = " ".join(str(getattr(error, "message", "") or error).split())
        raise _BadBodyError(400, f"the body could not be read (Content-Encoding "
                            f"{shown(request.headers.get('Content-Encoding', 'none'), 60)}): {shown(reason, 200)}",
                            broken=True) from None
    except (OSError, EOFError) as error:  # the client went away mid-body
        raise _BadBodyError(400, f"the body ended early: {type(error).__name__}") from None
    return bytes(body)


def _decode(request: web.Request, data: bytes) -> Any:
    charset = (request.charset or "utf-8").strip().lower()
    codec = UTF8_NAMES.get(charset)
    if codec is None:
        raise _BadBodyError(400, f"the charset {shown(charset, 60)} of the header Content-Type is not supported; "
                            "send the JSON as UTF-8")
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as error:
        raise _BadBodyError(400, f"the body is not valid {codec.upper()}: byte 0x{data[error.start]:02x} at position "
                            f"{error.start}") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise _BadBodyError(400, "the body is not valid JSON: it is nested too deeply") from None
    except ValueError as error:  # JSONDecodeError (names a position only), an integer of too many digits
        raise _BadBodyError(400, f"the body is not valid JSON: {cut(str(error), 200)}") from None


def _problems(error: ValidationError) -> str:
    """pydantic's problems as ``field 'x': why``, the first ``MAX_PROBLEMS`` of them; names and reasons cut."""
    problems = error.errors(include_url=False, include_input=False, include_context=False)
    text = "; ".join(f"field {shown('.'.join(str(p) for p in e['loc']) or '(body)', 100)}: "
                     f"{cut(e['msg'].removeprefix('Value error, '), 400)}" for e in problems[:MAX_PROBLEMS])
    if len(problems) > MAX_PROBLEMS:
        text += f"; and {len(problems) - MAX_PROBLEMS} more"
    return text


async def _parse(request: web.Request, model: type[_Body]) -> _Body | web.Response:
    """The validated body, or the 4xx answer that names what is wrong with it (never a 5xx)."""
    try:
        data = await _read_body(request) if request.body_exists else b""
        raw: Any = _decode(request, data) if data else {}
        if not isinstance(raw, dict):
            raise _BadBodyError(400, f"the body must be a JSON object, not {type(raw).__name__}")
        return model.model_validate(raw)
    except _BadBodyError as bad:
        return _bad_body_answer(request, bad)
    except ValidationError as error:
        return _error(400, _problems(error))
    except Exception as error:  # whatever else a body can do: a 400 and one line, never a 500
        log.warning("[memkit] %s %s: unreadable body: %s: %s", request.method, shown(request.path, 80),
                    type(error).__name__, cut(str(error), 200))
        return _error(400, f"the body could not be read: {type(error).__name__}")


def _ready_payload(service: MemKitService) -> dict[str, Any]:
    return readiness(service)  # the same source as status and the panel


def register_routes(routes: web.RouteTableDef) -> None:
    @routes.get("/memkit/status")
    async def memkit_status(_request: web.Request) -> web.Response:
        # measuring the cache takes its lock and may stat files: off the event loop
        payload = await asyncio.to_thread(lambda: build_status(get_service()))
        return web.json_response(payload)

    @routes.get("/memkit/ready")
    async def memkit_ready(_request: web.Request) -> web.Response:
        service = get_service()
        payload = _ready_payload(service)
        return web.json_response(payload, status=200 if payload["ready"] else 503)

    @routes.post("/memkit/preload")
    async def memkit_preload(request: web.Request) -> web.Response:
        if why := _refused(request):
            return await _refusal(request, why)
        body = await _parse(request, PreloadBody)
        if isinstance(body, web.Response):
            return body
        service = get_service()
        try:
            entries = service.entries_for(body.cache_keys)
        except ValueError as error:
            return _error(400, f"field 'cache_keys': {cut(str(error), 600)}")
        if not start_background_preload(service, entries):
            return _error(409, "a preload is already running; poll /memkit/ready")
        status_push.notify()
        if body.wait and not await _wait_ready(request, service, body.timeout_s):
            return web.json_response({**_ready_payload(service), "timed_out": True}, status=202)
        payload = _ready_payload(service)
        return web.json_response(payload, status=200 if payload["ready"] else 202)

    @routes.post("/memkit/evict")
    async def memkit_evict(request: web.Request) -> web.Response:
        if why := _refused(request):
            return await _refusal(request, why)
        body = await _parse(request, EvictBody)
        if isinstance(body, web.Response):
            return body
        service = get_service()
        evicted = service.evict(body.name, executing_thread=False)
        if not evicted:
            return _error(404, f"nothing cached under {shown(body.name)}")
        queue_release(service)
        return web.json_response({"evicted": evicted})

    @routes.post("/memkit/clear")
    async def memkit_clear(request: web.Request) -> web.Response:
        if why := _refused(request):
            return await _refusal(request, why)
        body = await _parse(request, ClearBody)
        if isinstance(body, web.Response):
            return body
        service = get_service()
        evicted = service.clear(body.include_pinned, executing_thread=False)
        queue_release(service)
        return web.json_response({"evicted": evicted})

    @routes.post("/memkit/pin")
    async def memkit_pin(request: web.Request) -> web.Response:
        if why := _refused(request):
            return await _refusal(request, why)
        body = await _parse(request, PinBody)
        if isinstance(body, web.Response):
            return body
        changed = get_service().set_pinned(body.name, body.pinned)  # sticks: later hits keep it
        if not changed:
            return _error(404, f"nothing cached under {shown(body.name)}")
        return web.json_response({"entries": changed, "pinned": body.pinned})


async def _wait_ready(request: web.Request, service: MemKitService, timeout_s: float) -> bool:
    """``wait: true``: poll until the preload is ready; False at the deadline. A client that has gone
    stops the wait too (aiohttp does not cancel the handler), with True: nobody reads the answer."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not service.preload.snapshot().ready:
        if request.transport is None or request.transport.is_closing():
            log.info("[memkit] the client of POST /memkit/preload left; the preload goes on")
            return True
        left = deadline - loop.time()
        if left <= 0:
            return False
        await asyncio.sleep(min(WAIT_POLL_SECONDS, left))
    return True


async def _observe_free(request: web.Request) -> None:
    if _refused(request, need_json=False):
        return  # a page of another origin: ComfyUI's own /free did what it does; the cache stays
    try:
        body = await request.json()
    except (ValueError, LookupError, RecursionError):  # ComfyUI read it already; be as lenient as before
        body = {}
    if isinstance(body, dict) and (body.get("unload_models") or body.get("free_memory")):
        service = get_service()
        dropped = service.clear(False, executing_thread=False)
        queue_release(service)
        if body.get("free_memory"):
            service.conditioning.clear_ram()  # plain tensors: no ComfyUI clean-up runs on dropping them
        status_push.notify()
        log.info("[memkit] /free evicted %d unpinned cache entries", len(dropped))


@web.middleware
async def free_memory_observer(request: web.Request, handler):
    """ComfyUI's POST /free (unload_models / free_memory) also drops unpinned cache entries.
    Whatever goes wrong on our side is logged: ComfyUI's answer is passed on as it is."""
    response = await handler(request)
    if request.method == "POST" and request.path in ("/free", "/api/free") and response.status == 200:
        try:
            await _observe_free(request)
        except Exception as error:  # never turn ComfyUI's 200 into a 500
            log.warning("[memkit] /free: could not drop the unpinned cache entries: %s: %s",
                        type(error).__name__, cut(str(error), 200))
    return response


def install(server: Any) -> None:
    """Register our routes and the /free observer on ComfyUI's PromptServer."""
    register_routes(server.routes)
    template_thumbnails.register_routes(server.routes)
    server.app.middlewares.append(free_memory_observer)
    status_push.install(server)
