"""The V3 extension ComfyUI gets from ``comfy_entrypoint``: nodes, routes, start-up preload.

One broken part never hides the package: each node module and the routes are set up on their
own; one that fails (e.g. a ComfyUI version whose API differs) is left out with one log line
naming it, and everything else still registers.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from comfy_api.latest import ComfyExtension, io

from ..model_cache import comfy_models
from ..model_cache.bounded import cut
from ..model_cache.service import get_service

log = logging.getLogger("memkit")

NODE_MODULES = ("cached_loaders", "selectors", "cached_node", "cache_info", "preload", "conditioning", "tiled_decode",
                "step_cache")


def _import_node_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except Exception as error:
        log.error("[memkit] nodes/%s.py could not be loaded on ComfyUI %s, its nodes are left out: %s: %s",
                  name, comfy_models.comfy_version(), type(error).__name__, error)
        return None


def _node_list(name: str, module: ModuleType) -> list[type[io.ComfyNode]]:
    """The module's nodes whose schema this ComfyUI accepts (one line per node it does not)."""
    usable = []
    for node in module.NODES:
        try:
            node.GET_SCHEMA()
        except Exception as error:
            log.error("[memkit] node %s (nodes/%s.py) is left out on ComfyUI %s: %s: %s", node.__name__, name,
                      comfy_models.comfy_version(), type(error).__name__, error)
            continue
        usable.append(node)
    return usable


def _attach_to_server() -> None:
    try:
        from server import PromptServer

        from . import http_api
    except Exception as error:
        log.error("[memkit] HTTP routes left out: %s: %s", type(error).__name__, error)
        return
    if getattr(PromptServer, "instance", None) is None:  # ComfyUI used as a library, without its server
        return
    try:
        http_api.install(PromptServer.instance)
    except Exception as error:
        log.error("[memkit] HTTP routes left out on ComfyUI %s: %s: %s", comfy_models.comfy_version(),
                  type(error).__name__, error)


class MemKitExtension(ComfyExtension):
    def __init__(self) -> None:
        _attach_to_server()
        try:
            service = get_service()
        except Exception as error:  # the nodes still register; each of them reports the problem
            log.exception("[memkit] the MemKit service could not start: %s", error)
            return
        try:
            from .preload_queue import start_preload  # imported here: if it cannot be, only the preload is out

            start_preload(service)
        except Exception as error:  # the nodes still register; status shows the problem
            log.exception("[memkit] start-up preload could not start: %s", error)
            service.preload.finish(reason=f"the start-up preload could not start ({type(error).__name__}: "
                                          f"{cut(str(error), 300)})")

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        found: list[type[io.ComfyNode]] = []
        for name in NODE_MODULES:
            module = _import_node_module(name)
            if module is not None:
                found += _node_list(name, module)
        return found
