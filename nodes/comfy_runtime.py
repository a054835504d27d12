"""What the nodes read from the running ComfyUI: the prompt being executed, its cache settings.

Kept in one place because these are ComfyUI internals (``PromptServer.instance.last_prompt_id``,
``comfy.cli_args.args``); each read falls back to a safe answer when a version lacks it.
"""

from __future__ import annotations

from typing import Any


def prompt_token() -> Any:
    """The id of the prompt ComfyUI is executing (counts one use per prompt), or None."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(getattr(PromptServer, "instance", None), "last_prompt_id", None)


def ram_headroom_gb() -> float:
    """ComfyUI's ``--cache-ram`` headroom in GB (0 when RAM-pressure caching is off)."""
    try:
        from comfy.cli_args import args
    except ImportError:
        return 0.0
    value = getattr(args, "cache_ram", 0) or 0
    return float(value) if isinstance(value, int | float) else 0.0
