"""The ComfyUI side of the cache: load exactly as ComfyUI's loaders do, measure, clone, place.

Every miss calls a ComfyUI node by its id (for the four kinds ComfyUI's own
``CheckpointLoaderSimple``, ``UNETLoader``, ``VAELoader``, ``CLIPLoader``, ``DualCLIPLoader``,
``TripleCLIPLoader``) through the node registry, V1 or V3 alike, so a cached model is the model
ComfyUI would have built, in whatever ComfyUI version runs. Every ComfyUI symbol the cache uses is
imported in this module only, also the reads of the running ComfyUI (the prompt it executes, its
RAM-pressure headroom), each of which falls back to a safe answer when a version lacks it.

Thread rule: ``load`` may run before ComfyUI's prompt worker starts or on the executing thread;
``place_on_device``, ``raise_interrupt``, ``progress_bar`` and ``prompt_token`` only on the
executing thread (ComfyUI's model management keeps its state without a lock; the prompt and the
node they name are the ones that thread runs).
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import inspect
import itertools
import json
import math
import os
import sys
import uuid
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from .cache import Footprint
from .recipe import ModelKind, NodeCall

NONE_NAME = "none"


class LoadedValue:
    """What the cache stores: the parts a loader returned (MODEL, CLIP, VAE ...).

    A plain object so that the cache can hold it weakly once evicted; every clone handed out
    refers back to it, so it lives exactly as long as some prompt or ComfyUI's output cache
    holds one of our clones.
    """

    __slots__ = ("__weakref__", "key", "parts", "sharing")

    def __init__(self, parts: tuple[Any, ...], key: str | None = None) -> None:
        self.parts = parts
        self.key = key  # the recipe key, once cached: what a text encoder's outputs are keyed on
        self.sharing: Any = None  # weight_sharing.Sharing when the shared weight store is on


# --- host choices ----------------------------------------------------------------------------

def _node_class(node_id: str) -> type:
    import nodes

    try:
        return nodes.NODE_CLASS_MAPPINGS[node_id]
    except KeyError:
        raise RuntimeError(f"ComfyUI has no node {node_id!r} (not in this ComfyUI version, or the node pack "
                           "that provides it is not installed or failed to load)") from None


def _input_options(node_id: str, section: str, name: str) -> tuple[str, ...]:
    """The choices of a combo input of a V1 or V3 node, as /object_info reports them."""
    cls = _node_class(node_id)
    spec = cls.INPUT_TYPES()[section][name]
    options = spec[0] if isinstance(spec[0], list | tuple) else spec[1].get("options", [])
    return tuple(options)


def clip_types() -> tuple[str, ...]:
    """The clip types ComfyUI's single and dual CLIP loaders offer, in their order."""
    seen: list[str] = []
    for node_id in ("CLIPLoader", "DualCLIPLoader"):
        for name in _input_options(node_id, "required", "type"):
            if name not in seen:
                seen.append(name)
    return tuple(seen)


def weight_dtypes() -> tuple[str, ...]:
    return _input_options("UNETLoader", "required", "weight_dtype")


def clip_devices() -> tuple[str, ...]:
    return _input_options("CLIPLoader", "optional", "device")


def file_choices(kind: ModelKind) -> list[str]:
    import folder_paths
    import nodes

    if kind is ModelKind.VAE:
        return nodes.VAELoader.vae_list(nodes.VAELoader)
    return folder_paths.get_filename_list(kind.folder)


def resolve(kind: ModelKind, name: str) -> str | None:
    """The file behind a model name, searched only inside ComfyUI's model folders."""
    import folder_paths

    if name not in folder_paths.get_filename_list(kind.folder):
        return None
    return folder_paths.get_full_path(kind.folder, name)


def node_input_types(node_id: str) -> dict[str, Any]:
    """A node's inputs as ``INPUT_TYPES()`` gives them (V3 nodes have the same view in ComfyUI)."""
    return _node_class(node_id).INPUT_TYPES()


SKIPPED_FOLDERS = ("custom_nodes", "configs")


def node_model_files(inputs: dict[str, Any]) -> list[str]:
    """The model files a loader's inputs name: every string input that is a file in one of ComfyUI's
    model folders (their identity on disk is part of the cache key, so a replaced file reloads)."""
    import folder_paths

    found: set[str] = set()
    for value in inputs.values():
        if not isinstance(value, str) or not value:
            continue
        for folder in folder_paths.folder_names_and_paths:
            if folder in SKIPPED_FOLDERS or value not in folder_paths.get_filename_list(folder):
                continue
            path = folder_paths.get_full_path(folder, value)
            if path is not None:
                found.add(path)
    return sorted(found)


def user_directory() -> str | None:
    import folder_paths

    return folder_paths.get_user_directory()


# --- loading ---------------------------------------------------------------------------------

def call_node(node_id: str, **inputs: Any) -> tuple[Any, ...]:
    """Run a ComfyUI node's function with these inputs, whether it is a V1 or a V3 node."""
    cls = _node_class(node_id)
    if hasattr(cls, "define_schema"):
        result = cls.execute(**inputs)
        if inspect.isawaitable(result):
            raise RuntimeError(f"{node_id} is asynchronous; MemKit can only call synchronous loaders")
        return tuple(result.result if hasattr(result, "result") else result)
    return tuple(getattr(cls(), cls.FUNCTION)(**inputs))


def load(call: NodeCall, outputs: int | None = None) -> LoadedValue:
    """Call the node; its first ``outputs`` parts (all for None), as it returns them."""
    return LoadedValue(call_node(call.node, **call.kwargs())[:outputs])


def is_empty(value: LoadedValue) -> bool:
    """ComfyUI returns None for a part it could not detect (e.g. not a model it knows)."""
    return not value.parts or value.parts[0] is None


# --- clones ----------------------------------------------------------------------------------

def _clone_part(part: Any) -> Any:
    if part is None:
        return None
    if hasattr(part, "clone"):  # ModelPatcher, CLIP
        return part.clone()
    if hasattr(part, "patcher"):  # comfy.sd.VAE has no clone(): share weights, own patcher
        twin = copy.copy(part)
        twin.patcher = part.patcher.clone()
        return twin
    return part


def uncloned_parts(value: LoadedValue) -> list[str]:
    """The types of the parts that cannot be cloned: every prompt gets the cached object itself."""
    return [type(part).__name__ for part in value.parts
            if part is not None and not hasattr(part, "clone") and not hasattr(part, "patcher")
            and not isinstance(part, str | int | float | bool)]


def clone(value: LoadedValue) -> tuple[Any, ...]:
    """Copies whose patches (LoRA, hooks, options) never reach the cached original.

    Each clone refers back to ``value``, which keeps it alive while ComfyUI holds the clone.
    """
    clones = tuple(_clone_part(part) for part in value.parts)
    for twin in clones:
        # on the patcher too: ComfyUI's own clones of a CLIP or VAE (LoRA, hooks) keep our patcher
        for holder in (twin, getattr(twin, "patcher", None)):
            if holder is not None:
                with contextlib.suppress(AttributeError):  # __slots__: it just does not keep value alive
                    holder._memkit_origin = value
    return clones


# --- text encoder identity -------------------------------------------------------------------

_object_tokens: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _object_token(module: Any) -> str:
    """A name for a live object that is never reused by another one (``id()`` can be)."""
    token = _object_tokens.get(module)
    if token is None:
        token = _object_tokens[module] = uuid.uuid4().hex
    return token


def encoder_identity(clip: Any) -> tuple[str, bool] | None:
    """What determines a CLIP's outputs for a given text, as (identity, stable across restarts).

    Stable: a MemKit text encoder (its recipe key: files, their identity, type, device) with no
    patches, plus its clip layer, tokenizer options, load device and ComfyUI version. A CLIP from
    elsewhere gets a name for this process only (RAM cache). None (never cached): patches (LoRA),
    hooks, scheduled encoding or model options, whose effect MemKit does not try to key.
    """
    patcher = getattr(clip, "patcher", None)
    model = getattr(clip, "cond_stage_model", None)
    if patcher is None or model is None:
        return None
    object_patches = _plain_object_patches(patcher)
    if (getattr(clip, "apply_hooks_to_conds", None) or getattr(clip, "use_clip_schedule", False)
            or getattr(patcher, "hook_patches", None) or getattr(patcher, "forced_hooks", None)
            or patcher.patches or object_patches is None
            or patcher.model_options != {"transformer_options": {}}):
        return None
    origin = _origin_of(clip)
    ours = origin is not None and any(getattr(part, "cond_stage_model", None) is model for part in origin.parts)
    key = getattr(origin, "key", None) if ours else None
    base = f"memkit:{key}" if key else f"object:{_object_token(model)}"
    options = json.dumps(getattr(clip, "tokenizer_options", {}), sort_keys=True, default=repr)
    parts = [base, repr(getattr(clip, "layer_idx", None)), options, str(patcher.load_device), comfy_version()]
    if object_patches:  # only then: the identities of CLIPs without any stay what they were
        parts.append(object_patches)
    return json.dumps(parts), key is not None


PLAIN_PATCH_VALUES = (bool, int, float, str, type(None))


def _plain_object_patches(patcher: Any) -> list[list[str]] | None:
    """A patcher's object patches as sorted ``[name, repr]`` pairs when each is a plain value (a
    dtype, a number, a string), which the identity can carry; None when one is not (a module, a
    function: its effect cannot be keyed). ComfyUI 0.38 gives every CLIP one, ``manual_cast_dtype``
    = float32; refusing all object patches would turn the cache off there."""
    import torch

    patches = getattr(patcher, "object_patches", None) or {}
    if not all(isinstance(value, (torch.dtype, *PLAIN_PATCH_VALUES)) for value in patches.values()):
        return None
    return sorted([str(name), repr(value)] for name, value in patches.items())


def _origin_of(clip: Any) -> LoadedValue | None:
    """The cached value a CLIP comes from: ours, or reached through ComfyUI's clones of it
    (``CLIP.clone`` clones the patcher, whose ``parent`` leads back to the one we handed out)."""
    origin = getattr(clip, "_memkit_origin", None)
    patcher, seen = getattr(clip, "patcher", None), 0
    while origin is None and patcher is not None and seen < 64:
        origin = getattr(patcher, "_memkit_origin", None)
        patcher, seen = getattr(patcher, "parent", None), seen + 1
    return origin


def text_encoder_placement(device: str) -> tuple[str, str]:
    """The device and dtype CLIPLoader would give a text encoder loaded with this ``device`` input,
    found without loading it (a conditioning cached by file name is reused only for the same)."""
    import comfy.model_management as mm

    load_device = torch.device("cpu") if device == "cpu" else mm.text_encoder_device()
    return str(load_device), str(mm.text_encoder_dtype(load_device))


def clip_load_device(clip: Any) -> str:
    return str(clip.patcher.load_device)


def encode_text(clip: Any, text: str) -> list:
    """ComfyUI's own CLIPTextEncode, so a miss is exactly what that node returns."""
    return call_node("CLIPTextEncode", clip=clip, text=text)[0]


# --- measuring and placing -------------------------------------------------------------------

def module_of(part: Any) -> torch.nn.Module | None:
    """The torch module holding a part's weights: the part itself, or a ModelPatcher's ``model``,
    a CLIP's ``cond_stage_model``, a VAE's ``first_stage_model``; None for other objects."""
    if isinstance(part, torch.nn.Module):
        return part
    for attribute in ("model", "cond_stage_model", "first_stage_model"):
        module = getattr(part, attribute, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def _tensors(value: LoadedValue) -> Iterable[torch.Tensor]:
    for part in value.parts:
        module = module_of(part) if part is not None else None
        if module is not None:
            yield from module.parameters()
            yield from module.buffers()
        elif part is not None and hasattr(part, "__dict__"):  # another loader's object: its own tensors
            yield from (v for v in vars(part).values() if isinstance(v, torch.Tensor))


def _patch_backups(value: LoadedValue) -> Iterable[torch.Tensor]:
    """The original weights ComfyUI's patchers keep while patches (LoRA) are applied in place.

    A clone shares its parent's ``backup`` dict, so what a prompt's clone backs up is found on
    the cached patcher; memory a cached model costs while in use."""
    for patcher in patchers(value):
        for saved in list(getattr(patcher, "backup", {}).values()):
            weight = getattr(saved, "weight", saved[0] if isinstance(saved, tuple) and saved else None)
            if isinstance(weight, torch.Tensor):
                yield weight


def file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files (``/proc/self/maps``; [] elsewhere)."""
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                    start, _, end = fields[0].partition("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        return []
    ranges.sort()
    return ranges


def _mapped(pointer: int, ranges: list[tuple[int, int]]) -> bool:
    index = bisect.bisect_right(ranges, (pointer, float("inf"))) - 1
    return index >= 0 and ranges[index][0] <= pointer < ranges[index][1]


def is_file_mapped(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether a CPU tensor's memory is mapped from a file (``ranges`` from ``file_mappings``)."""
    return tensor.device.type == "cpu" and _mapped(tensor.untyped_storage().data_ptr(), ranges)


def footprint(value: LoadedValue) -> Footprint:
    """Bytes of the distinct tensor storages a value holds (with its patchers' backups): private
    RAM, RAM mapped from a file (e.g. a loader that memory-maps its weights), tensors on the shared
    weight store's mapping (by tensor: one mapping holds them all) and accelerator memory."""
    seen: set[tuple[str, int]] = set()
    ram = vram = mapped = shared = 0
    sharing = getattr(value, "sharing", None)
    ranges: list[tuple[int, int]] | None = None
    for tensor in itertools.chain(_tensors(value), _patch_backups(value)):
        if tensor.device.type == "meta":
            continue
        if sharing is not None and sharing.holds(tensor):
            ident = ("shared", tensor.data_ptr())
            if ident not in seen:
                seen.add(ident)
                shared += tensor.numel() * tensor.element_size()
            continue
        storage = tensor.untyped_storage()
        ident = (str(tensor.device), storage.data_ptr())
        if ident in seen:
            continue
        seen.add(ident)
        if tensor.device.type != "cpu":
            vram += storage.nbytes()
            continue
        if ranges is None:
            ranges = file_mappings()
        if _mapped(storage.data_ptr(), ranges):
            mapped += storage.nbytes()
        else:
            ram += storage.nbytes()
    if shared and sharing.mapping is not None:  # pages an in-place edit copied are this process's own
        written = min(sharing.mapping.private_bytes(max_age=1.0), shared)
        shared, ram = shared - written, ram + written
    return Footprint(ram, vram, mapped, shared)


_UPCAST_KINDS = (ModelKind.CHECKPOINT, ModelKind.DIFFUSION_MODEL, ModelKind.VAE)
_TEXT_ENCODER_PREFIXES = ("cond_stage_model.", "conditioner.", "text_encoders.")
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATS = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def load_peak_ram(recipe: Any) -> int:
    """RAM a load takes at its peak, before it is made (the budget reserves it): ComfyUI reads
    each file's tensors into RAM, then builds the model from them (``expected_ram``)."""
    return recipe.file_bytes + expected_ram(recipe)


def expected_ram(recipe: Any) -> int:
    """RAM a loaded model will hold: each safetensors file's tensors at the dtype ComfyUI will
    hold them in. On a CPU ComfyUI computes the diffusion model
    and the VAE in float32, so 16-bit weights double (text encoders stay 16-bit); an fp8
    ``weight_dtype`` stores one byte. Other formats (GGUF, .ckpt): the file size."""
    on_cpu = _compute_on_cpu()
    weight_dtype = recipe.call.kwargs().get("weight_dtype", "default")
    total = 0
    for path, identity in zip(recipe.paths, recipe.identities):
        header = safetensors_header(path) if path.endswith(".safetensors") else None
        if header is None:
            total += identity.size
            continue
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            dtype, count = info.get("dtype", ""), math.prod(info.get("shape", []))
            size = _DTYPE_BYTES.get(dtype, 4)
            if dtype in _FLOATS and weight_dtype.startswith("fp8"):
                size = 1
            elif (dtype in _FLOATS and on_cpu and recipe.kind in _UPCAST_KINDS
                  and not name.startswith(_TEXT_ENCODER_PREFIXES)):
                size = max(size, 4)
            total += count * size
    return total


def safetensors_header(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 0 < length <= 100 * 2**20:
                return None
            header = json.loads(handle.read(length))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


def _compute_on_cpu() -> bool:
    import comfy.model_management as mm

    return mm.get_torch_device().type == "cpu"


_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                 "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def torch_device() -> torch.device:
    """The device ComfyUI computes on."""
    import comfy.model_management as mm

    return mm.get_torch_device()


def meta_state_dict(header: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A state dict of meta tensors with a safetensors file's names, dtypes and shapes."""
    state = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = getattr(torch, _TORCH_DTYPES.get(info.get("dtype", ""), ""), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{name}: safetensors dtype {info.get('dtype')!r}")
        state[name] = torch.empty(info["shape"], dtype=dtype, device="meta")
    return state, header.get("__metadata__")


def _dtype(text: str | None) -> torch.dtype | None:
    if text in (None, "None"):
        return None
    dtype = getattr(torch, str(text).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {text!r}")
    return dtype


def _diffusion_model_on_meta(state: dict[str, torch.Tensor], metadata: Any, unet: dict[str, str] | None,
                             checkpoint: bool, fp8_fast: bool = False) -> Any:
    """ComfyUI's diffusion model (detected from the tensor names and shapes, as its loaders do) on
    the meta device, at the dtypes ComfyUI chose when it built the stored copy."""
    import comfy.model_detection as detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils

    if unet is None:
        raise ValueError("the store file does not say the diffusion model's dtype")
    prefix = detection.unet_prefix_from_state_dict(state)
    if not checkpoint:  # UNETLoader takes the diffusion model out of a checkpoint too
        inner = comfy.utils.state_dict_prefix_replace(state, {prefix: ""}, filter_keys=True)
        state, prefix = (inner or state), ""
    config = detection.model_config_from_unet(state, prefix, metadata=metadata)
    if config is None:
        raise ValueError("ComfyUI does not detect the diffusion model from its tensor names alone")
    config.set_inference_dtype(_dtype(unet["dtype"]), _dtype(unet.get("manual_cast")))
    config.custom_operations = None
    if fp8_fast:
        config.optimizations["fp8"] = True
    model = config.get_model(state, prefix, device=torch.device("meta"))
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_on_meta(call: NodeCall, states: list[tuple[dict[str, torch.Tensor], Any]],
                  unet: dict[str, str] | None) -> tuple[Any, ...]:
    """What the loader ``call`` returns, built by ComfyUI's constructors on the meta device from
    its files' meta state dicts and metadata (``meta_state_dict``: no weights read). For ComfyUI's
    core loaders only; raises ValueError where a loader's file is not what this path knows (the
    caller then builds from the file)."""
    import comfy.sd
    import folder_paths

    inputs = call.kwargs()
    meta = torch.device("meta")
    embeddings = folder_paths.get_folder_paths("embeddings")
    if call.node == "CheckpointLoaderSimple" and len(states) == 1:
        state, metadata = states[0]
        _, clip, vae, _ = comfy.sd.load_state_dict_guess_config(
            dict(state), output_vae=True, output_clip=True, embedding_directory=embeddings, output_model=False,
            te_model_options={"initial_device": meta}, metadata=metadata)
        return (_diffusion_model_on_meta(state, metadata, unet, checkpoint=True), clip, vae)
    if call.node == "UNETLoader" and len(states) == 1:
        state, metadata = states[0]
        fast = inputs.get("weight_dtype") == "fp8_e4m3fn_fast"
        return (_diffusion_model_on_meta(dict(state), metadata, unet, checkpoint=False, fp8_fast=fast),)
    if call.node == "VAELoader" and len(states) == 1:
        vae = comfy.sd.VAE(sd=dict(states[0][0]))
        vae.throw_exception_if_invalid()
        return (vae,)
    if call.node in ("CLIPLoader", "DualCLIPLoader") and states:
        if any(metadata and "_quantization_metadata" in metadata for _, metadata in states):
            raise ValueError("a quantized text encoder")
        clip_type = getattr(comfy.sd.CLIPType, str(inputs.get("type", "stable_diffusion")).upper(),
                            comfy.sd.CLIPType.STABLE_DIFFUSION)
        options: dict[str, Any] = {"initial_device": meta}
        if inputs.get("device") == "cpu":
            options["load_device"] = options["offload_device"] = torch.device("cpu")
        clip = comfy.sd.load_text_encoder_state_dicts([dict(s) for s, _ in states], embedding_directory=embeddings,
                                                      clip_type=clip_type, model_options=options)
        return (clip,)
    raise ValueError(f"{call.node} with {len(states)} files has no build on the meta device")


def settle_after_meta_build(value: LoadedValue) -> None:
    """A model built on the meta device says it is on the offload device, where its weights are."""
    for patcher in patchers(value):
        model = getattr(patcher, "model", None)
        if getattr(model, "device", None) == torch.device("meta"):
            model.device = patcher.offload_device


def is_interrupt(error: BaseException) -> bool:
    """Whether ``error`` is ComfyUI's /interrupt (it must stop a preload, not fail one entry)."""
    import comfy.model_management

    return isinstance(error, comfy.model_management.InterruptProcessingException)


def devices(value: LoadedValue) -> str:
    """Where the weights are now, e.g. ``cpu`` or ``cpu,cuda:0`` (ComfyUI moves them as it needs)."""
    found = set()
    for part in value.parts:
        module = module_of(part) if part is not None else None
        tensor = next(iter(module.parameters()), None) if module is not None else None
        if tensor is not None:
            found.add(str(tensor.device))
    return ",".join(sorted(found)) or "-"


def patchers(value: LoadedValue) -> list[Any]:
    """The ModelPatchers of a value: a MODEL is one; a CLIP or a VAE has one as ``.patcher``."""
    from comfy.model_patcher import ModelPatcher

    found = []
    for part in value.parts:
        patcher = part if isinstance(part, ModelPatcher) else getattr(part, "patcher", None)
        if isinstance(patcher, ModelPatcher):
            found.append(patcher)
    return found


def place_on_device(value: LoadedValue) -> None:
    """Move a cached value to its load device through ComfyUI's model management (executing thread only)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu(patchers(value))


# --- attention --------------------------------------------------------------------------------

ATTENTION_MODES = ("default", "sdpa", "sage")
OVERRIDE_KEY = "optimized_attention_override"  # read by comfy.ldm.modules.attention.wrap_attn


def attention_function(mode: str) -> tuple[Any, str | None]:
    """ComfyUI's attention function for a mode (None: ComfyUI's default), and why a mode the user
    chose cannot be had here (sage needs the optional ``sageattention`` package and a CUDA device)."""
    import comfy.ldm.modules.attention as attention

    if mode != "default" and not hasattr(attention, "wrap_attn"):
        return None, ("this ComfyUI has no per-model attention override (transformer_options"
                      "['optimized_attention_override'], in ComfyUI since September 2025)")
    if mode == "sdpa":
        return attention.attention_pytorch, None
    if mode == "sage":
        if not getattr(attention, "SAGE_ATTENTION_IS_AVAILABLE", False):
            return None, "the sageattention package is not installed (pip install sageattention)"
        if not torch.cuda.is_available():
            return None, "SageAttention needs a CUDA device"
        return attention.attention_sage, None
    if mode != "default":
        return None, f"unknown attention mode {mode!r} (one of {', '.join(ATTENTION_MODES)})"
    return None, None


class AttentionOverride:
    """The override ComfyUI calls instead of its attention backend: ``(func, *args, **kwargs)``,
    where ``func`` is the backend ComfyUI chose. A class (not a closure) so that the model options
    it sits in can be deep-copied and compared, and status can name it."""

    def __init__(self, mode: str, function: Any) -> None:
        self.mode, self.function = mode, function

    def __call__(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> AttentionOverride:
        return self

    def __repr__(self) -> str:
        return f"memkit attention {self.mode}"


def set_attention(model: Any, mode: str) -> str | None:
    """Make a MODEL clone run ``mode``'s attention (through ComfyUI's transformer options).
    Returns why it stays on ComfyUI's default, when it does."""
    function, unavailable = attention_function(mode)
    if function is not None:
        options = model.model_options.setdefault("transformer_options", {})
        options[OVERRIDE_KEY] = AttentionOverride(mode, function)
    return unavailable


# --- the executing thread --------------------------------------------------------------------

def interrupted() -> bool:
    """Whether the user asked ComfyUI to stop the running prompt (/interrupt)."""
    import comfy.model_management

    return comfy.model_management.processing_interrupted()


def raise_if_interrupted() -> None:
    """ComfyUI's own interrupt check (its progress bar no longer checks on every update)."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()


def raise_interrupt() -> None:
    """End the running prompt as ComfyUI's own interrupt does (and clear the request)."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
    raise comfy.model_management.InterruptProcessingException()


def progress_bar(total: int) -> Any:
    """ComfyUI's progress bar of the node it is running (the page shows it on the node)."""
    import comfy.utils

    return comfy.utils.ProgressBar(total)


def _prompt_server_class() -> Any:
    """ComfyUI's ``PromptServer`` when its server module is loaded, else None. Never imported here:
    without that module there is no running server (ComfyUI used as a library), and importing it
    (aiohttp and all) cost a first load half a second."""
    return getattr(sys.modules.get("server"), "PromptServer", None)


def prompt_token() -> Any:
    """The id of the prompt ComfyUI is executing (counts one use per prompt), or None: from the
    node's execution context where ComfyUI sets one (around a node's function), else the server's
    ``last_prompt_id`` (a fingerprint runs outside that context)."""
    try:
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
    except ImportError:  # older ComfyUI
        context = None
    if context is not None and getattr(context, "prompt_id", None):
        return context.prompt_id
    return getattr(getattr(_prompt_server_class(), "instance", None), "last_prompt_id", None)


# --- ComfyUI's run settings ------------------------------------------------------------------

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
    except ImportError:
        return 0.0
    other_mode = any(getattr(args, flag, False) for flag in ("cache_classic", "cache_lru", "cache_none", "high_ram"))
    return headroom_from_args(getattr(args, "cache_ram", 0),
                              ram_pressure_is_default=_version(comfy_version()) >= (0, 23) and not other_mode,
                              total_ram_gb=psutil.virtual_memory().total / 2**30)


def code_identity(node_id: str) -> str:
    """The file a node's code is in, with its size and mtime: a loader pack updated in place may
    build other tensors from the same model file."""
    try:
        path = inspect.getsourcefile(_node_class(node_id)) or ""
        info = os.stat(path)
    except Exception:  # no such node, built-in code: the ComfyUI version is all there is
        return "unknown"
    return f"{path}:{info.st_size}:{info.st_mtime_ns}"


def comfy_version() -> str:
    try:
        import comfyui_version

        return comfyui_version.__version__
    except ImportError:
        return "unknown"

