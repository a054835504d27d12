"""Import ComfyUI's modules into this process the way its own tests do."""

from __future__ import annotations

import os
import sys


def put_comfy_first_on_path() -> str:
    """ComfyUI's root first on sys.path: its `nodes` module must win over this repository's
    `nodes/` package when Python runs from the repository root."""
    root = os.environ.get("MEMKIT_COMFYUI")
    if not root:
        raise RuntimeError("MEMKIT_COMFYUI is not set: run through `make test` / `make bench` (scripts/host.py)")
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    return root


def import_comfy() -> None:
    """Make `comfy`, `folder_paths` and `nodes` importable, CPU only, without parsing our argv."""
    put_comfy_first_on_path()
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True
