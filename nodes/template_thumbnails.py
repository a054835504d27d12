"""The template browser's thumbnails, served where ComfyUI itself no longer serves them.

The page shows a package's workflow template with ``/api/workflow_templates/<package>/<name>.jpg``.
ComfyUI 0.3.x serves every file of the package's ``workflows/`` folder there; ComfyUI 0.38 serves
only the listed ``.json`` files, so the cards lose their pictures. This route serves the ``.jpg``
files of ``workflows/`` (nothing else: plain names only, no subfolders) under our package's own
folder name; registered with our other routes, before ComfyUI adds its own, so it answers first.
"""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

WORKFLOWS = Path(__file__).resolve().parent.parent / "workflows"
PACKAGE = Path(__file__).parent.parent.name  # the folder name ComfyUI knows the package by (a link's own name)
NAME = re.compile(r"[A-Za-z0-9_.-]+")


def register_routes(routes: web.RouteTableDef, package: str = PACKAGE) -> None:
    @routes.get(f"/workflow_templates/{package}/{{name}}.jpg")
    async def template_thumbnail(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = WORKFLOWS / f"{name}.jpg"
        if not NAME.fullmatch(name) or name.startswith(".") or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})
