"""The V3 extension ComfyUI gets from ``comfy_entrypoint``: nodes, routes, start-up preload."""

from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from ..model_cache.service import get_service
from . import cache_info, cached_loaders, http_api, selectors, tiled_decode

log = logging.getLogger("memkit")


def _attach_to_server() -> None:
    try:
        from server import PromptServer
    except ImportError:  # ComfyUI used as a library, without its server
        return
    if getattr(PromptServer, "instance", None) is None:
        return
    http_api.install(PromptServer.instance)


class MemKitExtension(ComfyExtension):
    def __init__(self) -> None:
        _attach_to_server()
        service = get_service()
        if service.config.settings.preload_mode != "off":
            # "blocking" returns only when every entry is loaded: ComfyUI then starts with them
            # in memory (what a memory snapshot wants); "background" serves at once.
            service.start_preload()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*cached_loaders.NODES, *selectors.NODES, *cache_info.NODES, *tiled_decode.NODES]
