"""comfyui-memkit: a model cache and a tiled VAE decoder for ComfyUI.

ComfyUI imports this folder as a package and calls ``comfy_entrypoint`` (the V3 extension API).
Everything that needs ComfyUI is imported inside that call, so importing the package elsewhere
(tests of the cores, tools) works without ComfyUI.
"""

from __future__ import annotations

__version__ = "0.1.0"

# The cache panel (a sidebar tab): plain ES modules that ComfyUI serves under /extensions/<folder>/.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: return the extension that lists our nodes."""
    from .nodes.extension import MemKitExtension

    return MemKitExtension()
