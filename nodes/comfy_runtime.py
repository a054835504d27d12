"""What the nodes read from the running ComfyUI: the prompt being executed, its cache settings.

Kept in one place because these are ComfyUI internals (``PromptServer.instance.last_prompt_id``,
``comfy.cli_args.args``); each read falls back to a safe answer when a version lacks it.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _prompt_server_class() -> Any:
    """Looked up once: a failed import would otherwise be retried (and recompiled) on every call."""
    try:
        from server import PromptServer
    except ImportError:  # ComfyUI used as a library, without its server
        return None
    return PromptServer


def prompt_token() -> Any:
    """The id of the prompt ComfyUI is executing (counts one use per prompt), or None."""
    return getattr(getattr(_prompt_server_class(), "instance", None), "last_prompt_id", None)


def headroom_from_args(cache_ram: Any, *, ram_pressure_is_default: bool, total_ram_gb: float) -> float:
    """The RAM headroom ComfyUI's RAM-pressure cache keeps, from its ``--cache-ram`` value.

    ComfyUI 0.3.x: one number (0 = off). From v0.23: ``[active_GB [inactive_GB]]`` and RAM
    pressure is the default mode, with an active headroom of min(10, max(2, 10% of RAM)) GB.
    """
    if isinstance(cache_ram, list | tuple):
        cache_ram = cache_ram[0] if cache_ram else None
    if isinstance(cache_ram, int | float) and not isinstance(cache_ram, bool) and cache_ram > 0:
        return float(cache_ram)
    if ram_pressure_is_default:
        return min(10.0, max(2.0, 0.1 * total_ram_gb))
    return 0.0


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def ram_headroom_gb() -> float:
    """ComfyUI's RAM-pressure headroom in GB for this run (0 when that caching is off)."""
    try:
        import psutil
        from comfy.cli_args import args

        from ..model_cache.comfy_models import comfy_version
    except ImportError:
        return 0.0
    other_mode = any(getattr(args, flag, False) for flag in ("cache_classic", "cache_lru", "cache_none", "high_ram"))
    return headroom_from_args(getattr(args, "cache_ram", 0),
                              ram_pressure_is_default=_version(comfy_version()) >= (0, 23) and not other_mode,
                              total_ram_gb=psutil.virtual_memory().total / 2**30)
