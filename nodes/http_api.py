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
from ..model_cache.service import MemKitService, entry_alias, get_service

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
    state = service.preload
    return {"ready": state.ready, "mode": state.mode, "done": state.done, "total": state.total,
            "failed": sorted(state.failures)}


def register_routes(routes: web.RouteTableDef) -> None:
    @routes.get("/memkit/status")
    async def memkit_status(_request: web.Request) -> web.Response:
        return web.json_response(get_service().status())

    @routes.get("/memkit/ready")
    async def memkit_ready(_request: web.Request) -> web.Response:
        service = get_service()
        return web.json_response(_ready_payload(service), status=200 if service.preload.ready else 503)

    @routes.post("/memkit/preload")
    async def memkit_preload(request: web.Request) -> web.Response:
        body = await _parse(request, PreloadBody)
        if isinstance(body, web.Response):
            return body
        service = get_service()
        entries = service.config.enabled_entries()
        if body.cache_keys is not None:
            by_alias = {entry_alias(e): e for e in entries}
            unknown = [k for k in body.cache_keys if k not in by_alias]
            if unknown:
                return _error(400, f"field 'cache_keys': unknown {', '.join(map(repr, unknown))}; "
                                   f"configured: {', '.join(sorted(by_alias)) or 'none'}")
            entries = [by_alias[k] for k in body.cache_keys]
        if not service.start_preload(entries, blocking=False):
            return _error(409, "a preload is already running; poll /memkit/ready")
        if body.wait:
            while not service.preload.ready:
                await asyncio.sleep(0.2)
        status = 200 if service.preload.ready else 202
        return web.json_response(_ready_payload(service), status=status)

    @routes.post("/memkit/evict")
    async def memkit_evict(request: web.Request) -> web.Response:
        body = await _parse(request, EvictBody)
        if isinstance(body, web.Response):
            return body
        evicted = get_service().cache.evict(body.name)
        if not evicted:
            return _error(404, f"nothing cached under {body.name!r}")
        return web.json_response({"evicted": evicted})

    @routes.post("/memkit/clear")
    async def memkit_clear(request: web.Request) -> web.Response:
        body = await _parse(request, ClearBody)
        if isinstance(body, web.Response):
            return body
        return web.json_response({"evicted": get_service().cache.clear(include_pinned=body.include_pinned)})


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
            dropped = get_service().cache.clear(include_pinned=False)
            log.info("[memkit] /free dropped %d unpinned cache entries", len(dropped))
    return response


def install(server: Any) -> None:
    """Register our routes and the /free observer on ComfyUI's PromptServer."""
    register_routes(server.routes)
    server.app.middlewares.append(free_memory_observer)
