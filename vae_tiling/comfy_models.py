"""The ComfyUI side of tiled decode: its model management, interrupt, progress bar and Wan VAE blocks.

Every ComfyUI symbol ``vae_tiling`` uses is imported in this module only, inside the function that
needs it, so the planner and the blender import (and are tested) without ComfyUI.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch


def free_memory(vae: Any) -> float:
    """What ComfyUI reports free on the VAE's device: what ``auto`` sizes tiles from. ComfyUI 0.38's
    dynamic VRAM counts what it can evict through the model's own patcher (``get_free_memory`` on
    the plain module under-reports there); older ComfyUI has only the module's."""
    from comfy import model_management

    own = getattr(getattr(vae, "patcher", None), "get_free_memory", None)
    return own(vae.device) if callable(own) else model_management.get_free_memory(vae.device)


def load(vae: Any, memory_required: float) -> None:
    """Put the VAE on its decode device as ``VAE.decode`` does, asking ComfyUI for
    ``memory_required`` bytes beside it (ComfyUI offloads other models to make that room)."""
    from comfy import model_management

    model_management.load_models_gpu([vae.patcher], memory_required=memory_required,
                                     force_full_load=vae.disable_offload)


def offload_device() -> torch.device:
    """Where ComfyUI keeps a VAE it is not running: where precise tiles wait between layers."""
    from comfy import model_management

    return model_management.vae_offload_device()


def empty_cache() -> None:
    """Give the allocator's cached blocks back after an out-of-memory error, before a retry."""
    from comfy import model_management

    model_management.soft_empty_cache()


def raise_if_interrupted() -> None:
    """ComfyUI's interrupt check: raises to stop the prompt (called between tiles)."""
    from comfy import model_management

    model_management.throw_exception_if_processing_interrupted()


def is_out_of_memory(error: BaseException) -> bool:
    """ComfyUI's own test where it has one (``is_oom``, ComfyUI 0.38: also a ``torch.AcceleratorError``
    out of memory), else its ``OOM_EXCEPTION``; never true where this torch has no such type (ComfyUI
    then names ``Exception``, and retrying every error with smaller tiles would hide real ones)."""
    from comfy import model_management

    check = getattr(model_management, "is_oom", None)
    if callable(check):
        return bool(check(error))
    kind = model_management.OOM_EXCEPTION
    return kind is not Exception and isinstance(error, kind)


def progress_bar(total: int) -> Callable[[int, int], None]:
    """ComfyUI's progress bar for the running node, as a ``(done, total)`` callback."""
    from comfy.utils import ProgressBar

    return ProgressBar(total).update_absolute


def wan_vae_module() -> ModuleType:
    """ComfyUI's Wan 2.1 VAE module, whose blocks ``WanStages`` calls as ``WanVAE.decode`` does."""
    from comfy.ldm.wan import vae

    return vae


def wan_cache_layers(decoder: torch.nn.Module) -> int:
    """How many causal-cache slots a Wan decoder needs (``count_conv3d``; ``count_cache_layers`` from
    ComfyUI 0.38, which counts its 3-D resamplers too)."""
    module = wan_vae_module()
    count = getattr(module, "count_cache_layers", None) or module.count_conv3d
    return count(decoder)
