"""HTTP routes under /memkit/ on ComfyUI's PromptServer, and the /free hook.

Bodies are JSON objects validated with pydantic: unknown keys, wrong types and names that leave
ComfyUI's model folders get a 400 with a message naming the field.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from ..model_cache.config import check_model_name
from ..model_cache.service import MemKitService, get_service
from . import status_push
from .preload_queue import queue_release, start_background_preload

log = logging.getLogger("memkit.http")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PreloadBody(_Body):
    cache_keys: list[str] | None = None
    wait: bool = False


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


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _parse(request: web.Request, model: type[_Body]) -> _Body | web.Response:
    try:
        raw: Any = await request.json() if request.can_read_body else {}
    except ValueError as error:
        return _error(400, f"the body is not valid JSON: {error}")
    if not isinstance(raw, dict):
        return _error(400, "the body must be a JSON object")
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"field '{'.'.join(str(p) for p in e['loc']) or '(body)'}': "
                             f"{e['msg'].removeprefix('Value error, ')}" for e in error.errors())
        return _error(400, problems)


def _ready_payload(service: MemKitService) -> dict[str, Any]:
    state = service.preload.snapshot()
    return {"ready": state.ready, "state": state.state, "mode": state.mode, "phase": state.phase,
            "done": state.done, "total": state.total, "failed": sorted(state.failures),
            "warmup_error": state.warmup_error}


def register_routes(routes: web.RouteTableDef) -> None:
    @routes.get("/memkit/status")
    async def memkit_status(_request: web.Request) -> web.Response:
        return web.json_response(status_push.panel_status(get_service()))

    @routes.get("/memkit/ready")
    async def memkit_ready(_request: web.Request) -> web.Response:
        service = get_service()
        payload = _ready_payload(service)
        return web.json_response(payload, status=200 if payload["ready"] else 503)

    @routes.post("/memkit/preload")
    async def memkit_preload(request: web.Request) -> web.Response:
        body = await _parse(request, PreloadBody)
        if isinstance(body, web.Response):
            return body
        service = get_service()
        try:
            entries = service.entries_for(body.cache_keys)
        except ValueError as error:
            return _error(400, f"field 'cache_keys': {error}")
        if not start_background_preload(service, entries):
            return _error(409, "a preload is already running; poll /memkit/ready")
        status_push.notify()
        while body.wait and not service.preload.snapshot().ready:
            await asyncio.sleep(0.2)
        payload = _ready_payload(service)
        return web.json_response(payload, status=200 if payload["ready"] else 202)

    @routes.post("/memkit/evict")
    async def memkit_evict(request: web.Request) -> web.Response:
        body = await _parse(request, EvictBody)
        if isinstance(body, web.Response):
            return body
        service = get_service()
        evicted = service.evict(body.name, executing_thread=False)
        if not evicted:
            return _error(404, f"nothing cached under {body.name!r}")
        queue_release(service)
        return web.json_response({"evicted": evicted})

    @routes.post("/memkit/clear")
    async def memkit_clear(request: web.Request) -> web.Response:
        body = await _parse(request, ClearBody)
        if isinstance(body, web.Response):
            return body
        service = get_service()
        evicted = service.clear(body.include_pinned, executing_thread=False)
        queue_release(service)
        return web.json_response({"evicted": evicted})

    @routes.post("/memkit/pin")
    async def memkit_pin(request: web.Request) -> web.Response:
        body = await _parse(request, PinBody)
        if isinstance(body, web.Response):
            return body
        changed = get_service().set_pinned(body.name, body.pinned)  # sticks: later hits keep it
        if not changed:
            return _error(404, f"nothing cached under {body.name!r}")
        return web.json_response({"entries": changed, "pinned": body.pinned})


@web.middleware
async def free_memory_observer(request: web.Request, handler):
    """ComfyUI's POST /free (unload_models / free_memory) also drops unpinned cache entries."""
    response = await handler(request)
    if request.method == "POST" and request.path in ("/free", "/api/free") and response.status == 200:
        try:
            body = await request.json()
        except ValueError:
            body = {}
        if isinstance(body, dict) and (body.get("unload_models") or body.get("free_memory")):
            service = get_service()
            dropped = service.clear(False, executing_thread=False)
            queue_release(service)
            if body.get("free_memory"):
                service.conditioning.clear_ram()  # plain tensors: no ComfyUI clean-up runs on dropping them
            status_push.notify()
            log.info("[memkit] /free evicted %d unpinned cache entries", len(dropped))
    return response


def install(server: Any) -> None:
    """Register our routes and the /free observer on ComfyUI's PromptServer."""
    register_routes(server.routes)
    server.app.middlewares.append(free_memory_observer)
    status_push.install(server)
