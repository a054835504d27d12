"""Shared weights, the ComfyUI side: one copy of each cached model per host (``weight_store``).

After ComfyUI's loader builds a cached model, its tensors as ComfyUI holds them (after the dtype
ComfyUI chose) are written once to the store and the model's parameters and buffers become views
of a copy-on-write mapping of that file. A process that finds the file builds the model without
reading its model file: ComfyUI's own constructors run on the meta device from the file's tensor
names and shapes (kept in the manifest), then every tensor is pointed at the mapping. That path
exists for ComfyUI's core loaders (``FAST_LOADERS``); any other loader still shares its tensors
after it has built them. Where sharing cannot work the model stays private with the reason
(``Sharing.reason``), in status and one log line.

Thread rule: runs where loads run (before the prompt worker starts or on the executing thread);
nothing here moves a model between devices.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import comfy_models
from .recipe import LoadRecipe, NodeCall
from .weight_store import FORMAT, Manifest, MappedWeights, StoreError, WeightStore

log = logging.getLogger("memkit")

FAST_LOADERS = ("CheckpointLoaderSimple", "UNETLoader", "VAELoader", "CLIPLoader", "DualCLIPLoader")
# ComfyUI's options that change the tensors it builds (dtype, device placement)
_BUILD_OPTIONS = ("reserve_vram", "disable_smart_memory", "cpu", "gpu_only", "highvram", "normalvram", "lowvram",
                  "novram", "force_fp32", "force_fp16",
                  "fp32_unet", "fp64_unet", "bf16_unet", "fp16_unet", "fp8_e4m3fn_unet", "fp8_e5m2_unet",
                  "fp8_e8m0fnu_unet", "fp16_vae", "fp32_vae", "bf16_vae", "cpu_vae", "fp8_e4m3fn_text_enc",
                  "fp8_e5m2_text_enc", "fp16_text_enc", "fp32_text_enc", "bf16_text_enc", "directml",
                  "cuda_device", "force_channels_last", "supports_fp8_compute", "fast", "disable_mmap")


class UnshareableError(RuntimeError):
    """This model cannot use the shared store (the message says why)."""


@dataclass
class Sharing:
    """How a cached value holds its weights: ``mapped`` (built from the store, no model file read),
    ``mapped-after-load`` (built from its file, then pointed at the store's copy), ``written``
    (built from its file, then written to the store and mapped), or ``private`` with the reason."""

    state: str
    store_key: str = ""
    reason: str | None = None
    mapping: MappedWeights | None = field(default=None, repr=False)
    nbytes: int = 0  # bytes of the tensors pointed at the mapping

    def holds(self, tensor: torch.Tensor) -> bool:
        return self.mapping is not None and self.mapping.holds(tensor)


def store_key(recipe: LoadRecipe) -> str:
    """The recipe's key plus everything that changes the tensors ComfyUI builds from the same files:
    ComfyUI's and torch's versions, the dtype and device options, the compute device."""
    from comfy.cli_args import args

    options = {name: _plain(getattr(args, name, None)) for name in _BUILD_OPTIONS}
    device = str(comfy_models.torch_device())
    if torch.cuda.is_available() and device.startswith("cuda"):
        device += ":" + torch.cuda.get_device_name()
    parts = [FORMAT, recipe.key, comfy_models.comfy_version(), comfy_models.code_identity(recipe.call.node),
             torch.__version__, device, options]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _plain(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


# --- the tensors of a loaded value -------------------------------------------------------------

def _modules(value: comfy_models.LoadedValue) -> list[tuple[int, torch.nn.Module]]:
    found = []
    for index, part in enumerate(value.parts):
        if part is None:
            continue
        module = comfy_models.module_of(part)
        if module is None:
            raise UnshareableError(f"its output {index} ({type(part).__name__}) holds no torch module")
        found.append((index, module))
    return found


def _slots(value: comfy_models.LoadedValue) -> list[tuple[str, torch.nn.Module, str, bool, torch.Tensor]]:
    """(name, owning module, attribute, is_parameter, tensor) for every parameter and buffer."""
    slots = []
    for index, root in _modules(value):
        for path, module in root.named_modules(remove_duplicate=False):
            for kind, table in ((True, module._parameters), (False, module._buffers)):
                for attribute, tensor in table.items():
                    if tensor is not None:
                        name = f"{index}.{path + '.' if path else ''}{attribute}"
                        slots.append((name, module, attribute, kind, tensor))
    return slots


def shareable_tensors(value: comfy_models.LoadedValue) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """The tensors to store (each storage region once, by its first name) and the other names of
    tensors that are the same memory (tied weights). Raises UnshareableError naming the first obstacle."""
    ranges = comfy_models.file_mappings()
    unique: list[tuple[str, torch.Tensor]] = []
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, _, _, _, tensor in _slots(value):
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise UnshareableError(f"{name} is a {type(tensor).__name__}, not a plain tensor")
        if tensor.device.type != "cpu":
            raise UnshareableError(f"{name} was built on {tensor.device}, not in RAM")
        if tensor.numel() and comfy_models.is_file_mapped(tensor, ranges):
            raise UnshareableError("ComfyUI maps this model's weights from its file itself")
        ident = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        unique.append((name, tensor))
    if not unique:
        raise UnshareableError("it holds no tensors")
    return unique, aliases


def rebind(value: comfy_models.LoadedValue, mapping: MappedWeights) -> None:
    """Point every parameter and buffer at its view of the mapping. Checked whole before anything
    changes: names, dtypes and shapes must be the stored ones (UnshareableError otherwise)."""
    views = mapping.tensors()
    aliases = mapping.manifest.info.get("aliases", {})
    slots = _slots(value)
    names = {name for name, *_ in slots}
    stored = set(views) | set(aliases)
    if names != stored:
        missing, extra = sorted(stored - names)[:3], sorted(names - stored)[:3]
        raise UnshareableError(f"its tensors differ from the stored ones (only stored: {missing}, only built: {extra})")
    plan = []
    for name, module, attribute, is_parameter, tensor in slots:
        view = views[aliases.get(name, name)]
        if view.dtype != tensor.dtype or view.shape != tensor.shape:
            raise UnshareableError(f"{name} is {tensor.dtype} {tuple(tensor.shape)}, stored as {view.dtype} "
                              f"{tuple(view.shape)}")
        plan.append((module, attribute, is_parameter, tensor, view))
    for module, attribute, is_parameter, tensor, view in plan:
        if is_parameter:
            replacement = torch.nn.Parameter(view, requires_grad=False)
            replacement.__dict__.update(getattr(tensor, "__dict__", {}))  # e.g. attributes ComfyUI's ops set
            module._parameters[attribute] = replacement
        else:
            module._buffers[attribute] = view


def _meta_leftovers(value: comfy_models.LoadedValue) -> list[str]:
    """Names of tensors still on the meta device after a build from the store (plain tensor
    attributes a constructor made, which the store does not hold)."""
    left = []
    for index, root in _modules(value):
        for path, module in root.named_modules():
            for attribute, item in list(vars(module).items()):
                if isinstance(item, torch.Tensor) and item.device.type == "meta":
                    left.append(f"{index}.{path}.{attribute}")
        left += [f"{index}.{n}" for n, t in root.named_parameters() if t.device.type == "meta"]
        left += [f"{index}.{n}" for n, t in root.named_buffers() if t.device.type == "meta"]
    for index, part in enumerate(value.parts):
        for attribute, item in list(getattr(part, "__dict__", {}).items()):
            if isinstance(item, torch.Tensor) and item.device.type == "meta":
                left.append(f"{index}.{attribute}")
    return left


# --- building from the store -------------------------------------------------------------------

def build_info(value: comfy_models.LoadedValue, recipe: LoadRecipe, aliases: dict[str, str]) -> dict[str, Any]:
    """What a process needs to build this value again around the stored tensors, and to tell
    when the store file is stale: the loader call, the model files' safetensors headers (names,
    dtypes, shapes: no weights) and identities, the diffusion model's dtypes."""
    headers = [comfy_models.safetensors_header(path) for path in recipe.paths]
    info: dict[str, Any] = {
        "node": recipe.call.node, "inputs": recipe.call.kwargs(), "kind": recipe.kind.value,
        "parts": [type(part).__name__ for part in value.parts], "aliases": aliases,
        "sources": [[path, i.size, i.mtime_ns, i.inode, i.ctime_ns]
                    for path, i in zip(recipe.paths, recipe.identities)],
        "headers": headers if all(h is not None for h in headers) else None,
    }
    model = getattr(value.parts[0], "model", None) if value.parts else None
    if model is not None and hasattr(model, "get_dtype"):
        info["unet"] = {"dtype": str(model.get_dtype()), "manual_cast": str(getattr(model, "manual_cast_dtype", None))}
    return info


def is_stale(manifest: Manifest) -> bool:
    """A stored model whose model file is gone or changed (size, mtime, inode or ctime); a file
    that cannot be read now is not taken for changed (the cap removes what nobody maps)."""
    for path, size, mtime_ns, inode, ctime_ns in manifest.info.get("sources", []):
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return True
        except OSError:  # unreadable now (a mount away, permissions): not known to have changed
            continue
        if (now.st_size, now.st_mtime_ns, now.st_ino, now.st_ctime_ns) != (size, mtime_ns, inode, ctime_ns):
            return True
    return False


def build_from_store(call: NodeCall, mapping: MappedWeights) -> comfy_models.LoadedValue:
    """The loader's value built around the stored tensors, without reading the model file: ComfyUI's
    constructors on the meta device, then every tensor pointed at the mapping. Raises UnshareableError."""
    info = mapping.manifest.info
    if call.node not in FAST_LOADERS:
        raise UnshareableError(f"{call.node} has no build from the store (only {', '.join(FAST_LOADERS)})")
    if info.get("node") != call.node or not info.get("headers"):
        raise UnshareableError("the store file was written without the model files' headers")
    try:
        states = [comfy_models.meta_state_dict(header) for header in info["headers"]]
        with torch.device("meta"):  # what ComfyUI's constructors allocate without naming a device
            parts = comfy_models.build_on_meta(call, states, info.get("unet"))
    except UnshareableError:
        raise
    except Exception as error:  # a ComfyUI constructor that needs real weights, a changed internal
        raise UnshareableError(f"building on the meta device failed: {type(error).__name__}: {str(error)[:200]}") \
            from None
    value = comfy_models.LoadedValue(parts)
    if [type(p).__name__ for p in value.parts] != info.get("parts"):
        raise UnshareableError(f"built {[type(p).__name__ for p in value.parts]}, stored {info.get('parts')}")
    rebind(value, mapping)
    left = _meta_leftovers(value)
    if left:
        raise UnshareableError(f"{len(left)} tensors are not in the store (e.g. {left[0]})")
    comfy_models.settle_after_meta_build(value)
    return value


# --- the policy --------------------------------------------------------------------------------

class WeightSharing:
    """Loads through the store: map and build, or build from the file, write once, map."""

    def __init__(self, store: WeightStore, wait_seconds: float = 600.0,
                 reclaim: Callable[[], None] | None = None) -> None:
        self.store = store
        self.wait_seconds = wait_seconds  # for another process writing the same model
        self.reclaim = reclaim  # hands freed heap back to the OS (the private copies just dropped)
        self._logged: set[str] = set()
        self._no_build: set[str] = set()  # keys whose build from the store failed in this process

    def load(self, recipe: LoadRecipe, from_file: Callable[[], comfy_models.LoadedValue],
             interrupted: Callable[[], bool] | None = None) -> comfy_models.LoadedValue:
        """The recipe's value with its weights on the store's mapping where possible. Only
        ``from_file``'s own errors (and interrupts) leave here: sharing that fails leaves a
        private copy with the reason."""
        built: list[comfy_models.LoadedValue] = []
        failed: list[BaseException] = []

        def load_file() -> comfy_models.LoadedValue:
            try:
                built.append(from_file())
            except BaseException as error:
                failed.append(error)
                raise
            return built[-1]

        try:
            key = store_key(recipe)
            value = self._from_store(recipe, key)
            if value is not None:
                return value
            if self._needs_no_writer(recipe, key):  # it will only map what is there: no lock to wait on
                value = load_file()
                self._share(value, recipe, key, may_write=False)
                return value
            with self.store.writer_lock(key, self.wait_seconds, interrupted) as locked:
                if not locked and interrupted is not None and interrupted():
                    comfy_models.raise_interrupt()
                if locked:
                    value = self._from_store(recipe, key)  # written by another process while this one waited
                    if value is not None:
                        return value
                value = load_file()
                self._share(value, recipe, key, may_write=locked)
            return value
        except Exception as error:
            if comfy_models.is_interrupt(error) or any(error is f for f in failed):
                raise  # the load's own failure (or a stop), not the store's
            value = built[-1] if built else load_file()
            self._private(value, recipe, f"{type(error).__name__}: {error}")
            return value

    def _needs_no_writer(self, recipe: LoadRecipe, key: str) -> bool:
        """A complete file is there already, and this process builds from the model file anyway."""
        return (recipe.call.node not in FAST_LOADERS or key in self._no_build) and self.store.manifest(key) is not None

    def expects_store_hit(self, recipe: LoadRecipe) -> bool:
        """Whether a load of the recipe will be built from the store (it then reads no model file)."""
        try:
            key = store_key(recipe)
            manifest = self.store.manifest(key)
        except Exception:
            return False
        return (manifest is not None and recipe.call.node in FAST_LOADERS and key not in self._no_build
                and bool(manifest.info.get("headers")))

    def _from_store(self, recipe: LoadRecipe, key: str) -> comfy_models.LoadedValue | None:
        if recipe.call.node not in FAST_LOADERS or key in self._no_build:
            return None  # built from its file; its tensors are then pointed at the store's copy
        mapping = self.store.open(key)
        if mapping is None:
            return None
        try:
            value = build_from_store(recipe.call, mapping)
            self._attach(value, Sharing("mapped", key, mapping=mapping, nbytes=_stored_bytes(mapping)))
        except Exception as error:
            mapping.close()
            if comfy_models.is_interrupt(error):
                raise
            self._no_build.add(key)  # not again in this process: the next loads go the plain way at once
            self._note(key, f"[memkit] shared weights: {_label(recipe)} is built from its file "
                            f"({type(error).__name__}: {str(error)[:300]})")
            return None
        return value

    def _share(self, value: comfy_models.LoadedValue, recipe: LoadRecipe, key: str, may_write: bool) -> None:
        mapping = None
        try:
            tensors, aliases = shareable_tensors(value)
            mapping = self.store.open(key)
            state = "mapped-after-load"
            if mapping is None:
                if not may_write:
                    raise UnshareableError("another process held the store's writer lock past the wait")
                self.store.sweep(is_stale)  # older versions of changed model files no process maps
                self.store.write(key, tensors, build_info(value, recipe, aliases))
                mapping, state = self.store.open(key), "written"
                if mapping is None:
                    raise UnshareableError("the file just written could not be mapped")
            del tensors
            rebind(value, mapping)
        except Exception as error:
            if mapping is not None:
                mapping.close()
            if comfy_models.is_interrupt(error):
                raise
            reason = str(error) if isinstance(error, UnshareableError | StoreError) else \
                f"{type(error).__name__}: {error}"
            self._private(value, recipe, reason)
            return
        self._attach(value, Sharing(state, key, mapping=mapping, nbytes=_stored_bytes(mapping)))
        if self.reclaim is not None:
            self.reclaim()

    def _private(self, value: comfy_models.LoadedValue, recipe: LoadRecipe, reason: str) -> None:
        value.sharing = Sharing("private", reason=reason[:300])
        self._note(recipe.key, f"[memkit] shared weights: {_label(recipe)} stays private: {reason[:300]}")

    @staticmethod
    def _attach(value: comfy_models.LoadedValue, sharing: Sharing) -> None:
        value.sharing = sharing
        if sharing.mapping is not None:
            weakref.finalize(value, sharing.mapping.close)  # the shared lock goes with the last clone

    def _note(self, key: str, message: str) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.info(message)

    def processes(self, sharing: Sharing) -> int | None:
        """How many processes map this value's store file (None where unknown)."""
        if sharing.mapping is None:
            return None
        with contextlib.suppress(Exception):
            return self.store.mappers(sharing.store_key)
        return None


def _stored_bytes(mapping: MappedWeights) -> int:
    return sum(t.nbytes for t in mapping.manifest.tensors)


def _label(recipe: LoadRecipe) -> str:
    return ", ".join(os.path.basename(p) for p in recipe.paths) or recipe.call.node
