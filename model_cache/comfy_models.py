"""The ComfyUI side of the cache: load exactly as ComfyUI's loaders do, measure, clone.

Every miss goes through ComfyUI's own loader classes (``nodes.CheckpointLoaderSimple``,
``nodes.UNETLoader``, ``nodes.VAELoader``) or, for text encoders, the same ``comfy.sd.load_clip``
call its CLIP loaders make, so a cached model is the model ComfyUI would have built.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch

from .recipe import ModelKind

FOLDERS: dict[ModelKind, str] = {
    ModelKind.CHECKPOINT: "checkpoints",
    ModelKind.TEXT_ENCODER: "text_encoders",
    ModelKind.DIFFUSION_MODEL: "diffusion_models",
    ModelKind.VAE: "vae",
}


def clip_types() -> tuple[str, ...]:
    """The clip types ComfyUI's single and dual CLIP loaders offer, in their order."""
    import nodes

    seen: list[str] = []
    for loader in (nodes.CLIPLoader, nodes.DualCLIPLoader):
        for name in loader.INPUT_TYPES()["required"]["type"][0]:
            if name not in seen:
                seen.append(name)
    return tuple(seen)


def weight_dtypes() -> tuple[str, ...]:
    import nodes

    return tuple(nodes.UNETLoader.INPUT_TYPES()["required"]["weight_dtype"][0])


def clip_devices() -> tuple[str, ...]:
    import nodes

    return tuple(nodes.CLIPLoader.INPUT_TYPES()["optional"]["device"][0])


def file_choices(kind: ModelKind) -> list[str]:
    import folder_paths
    import nodes

    if kind is ModelKind.VAE:
        return nodes.VAELoader.vae_list(nodes.VAELoader)
    return folder_paths.get_filename_list(FOLDERS[kind])


def resolve(kind: ModelKind, name: str) -> str | None:
    """The file behind a model name, searched only inside ComfyUI's model folders."""
    import folder_paths

    if name not in folder_paths.get_filename_list(FOLDERS[kind]):
        if kind is ModelKind.VAE and name in folder_paths.get_filename_list("vae_approx"):
            return folder_paths.get_full_path("vae_approx", name)
        return None
    return folder_paths.get_full_path(FOLDERS[kind], name)


def load(kind: ModelKind, names: list[str], options: dict[str, str]) -> Any:
    """Load through ComfyUI's standard path; returns what the matching core loader returns."""
    import comfy.sd
    import folder_paths
    import nodes

    if kind is ModelKind.CHECKPOINT:
        return tuple(nodes.CheckpointLoaderSimple().load_checkpoint(names[0]))
    if kind is ModelKind.DIFFUSION_MODEL:
        return nodes.UNETLoader().load_unet(names[0], options.get("weight_dtype", "default"))[0]
    if kind is ModelKind.VAE:
        return nodes.VAELoader().load_vae(names[0])[0]
    clip_type = getattr(comfy.sd.CLIPType, options.get("type", "stable_diffusion").upper(),
                        comfy.sd.CLIPType.STABLE_DIFFUSION)
    model_options = {}
    if options.get("device") == "cpu":
        model_options["load_device"] = model_options["offload_device"] = torch.device("cpu")
    paths = [folder_paths.get_full_path_or_raise("text_encoders", n) for n in names]
    return comfy.sd.load_clip(ckpt_paths=paths, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                              clip_type=clip_type, model_options=model_options)


def _parts(value: Any) -> Iterable[Any]:
    return value if isinstance(value, tuple) else (value,)


def _module_of(part: Any) -> torch.nn.Module | None:
    for attribute in ("model", "cond_stage_model", "first_stage_model"):
        module = getattr(part, attribute, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def tensor_bytes(value: Any) -> int:
    """Bytes of the distinct tensor storages a loaded value holds (shared weights once)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for part in _parts(value):
        module = _module_of(part)
        if module is None:
            continue
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            ident = (str(tensor.device), storage.data_ptr())
            if ident not in seen:
                seen.add(ident)
                total += storage.nbytes()
    return total


def device_of(value: Any) -> str:
    devices = set()
    for part in _parts(value):
        module = _module_of(part)
        tensor = next(iter(module.parameters()), None) if module is not None else None
        if tensor is not None:
            devices.add(str(tensor.device))
    return ",".join(sorted(devices)) or "-"


def clone(value: Any) -> Any:
    """A copy whose patches (LoRA, hooks, options) never reach the cached original."""
    if isinstance(value, tuple):
        return tuple(clone(part) for part in value)
    if value is None:
        return None
    if hasattr(value, "clone"):
        return value.clone()
    if hasattr(value, "patcher"):  # comfy.sd.VAE has no clone(); share weights, own patcher
        twin = copy.copy(value)
        twin.patcher = value.patcher.clone()
        return twin
    return value


def patchers(value: Any) -> list[Any]:
    found = []
    for part in _parts(value):
        if part is None:
            continue
        patcher = part if hasattr(part, "model_size") else getattr(part, "patcher", None)
        if patcher is not None:
            found.append(patcher)
    return found


def load_to_gpu(value: Any) -> None:
    """Move a cached value to the compute device through ComfyUI's model management."""
    import comfy.model_management

    comfy.model_management.load_models_gpu(patchers(value))


def user_directory() -> str | None:
    import folder_paths

    return folder_paths.get_user_directory()
