"""What a node or a config entry asks to load: a node call under a kind label, and its readable name.

Every load is a call of a ComfyUI node. The four kinds with a model folder are sugar for
ComfyUI's own loaders (``loader_call``), so a cached model is the one that loader builds; any
other loader is called by its node id (``Load.node``). The kind stays a label (selectors,
output types, status). The readable name, the default cache key users see and workflows keep,
is made from what was asked for: ``vae:file``, ``text_encoder:a+b[type=sdxl]``,
``node:CLIPVisionLoader(clip_name=x)``.

Pure: the node ids and input names are ComfyUI's, nothing of ComfyUI is imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .recipe import ModelKind, NodeCall

_LOADERS = {ModelKind.CHECKPOINT: "CheckpointLoaderSimple", ModelKind.DIFFUSION_MODEL: "UNETLoader",
            ModelKind.VAE: "VAELoader"}
_TEXT_ENCODER_LOADERS = ("CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader")  # by the number of files
_FILE_INPUTS = {"CheckpointLoaderSimple": ("ckpt_name",), "UNETLoader": ("unet_name",), "VAELoader": ("vae_name",),
                "CLIPLoader": ("clip_name",), "DualCLIPLoader": ("clip_name1", "clip_name2"),
                "TripleCLIPLoader": ("clip_name1", "clip_name2", "clip_name3")}
_CLIP_OPTIONS = {"type": "stable_diffusion", "device": "default"}
_OPTIONS = {"UNETLoader": {"weight_dtype": "default"}, "CLIPLoader": _CLIP_OPTIONS, "DualCLIPLoader": _CLIP_OPTIONS}


def loader_call(kind: ModelKind, names: Sequence[str], options: Mapping[str, str]) -> NodeCall:
    """The call of ComfyUI's own loader for a kind, with these files and options (the loader's
    defaults for those left out). TripleCLIPLoader has neither a type nor a device input: three
    text encoders load with device 'default' only (a ValueError otherwise) and any type."""
    if kind is ModelKind.TEXT_ENCODER:
        if not 1 <= len(names) <= len(_TEXT_ENCODER_LOADERS):
            raise ValueError(f"one to three text encoders load together, not {len(names)}")
        node = _TEXT_ENCODER_LOADERS[len(names) - 1]
    elif kind in _LOADERS:
        node = _LOADERS[kind]
    else:
        raise ValueError(f"{kind.value} has no loader of its own; a node is called by its id")
    files = _FILE_INPUTS[node]
    if len(names) != len(files):  # the text encoders' loader is chosen by the count: only one-file loaders
        raise ValueError(f"{node} loads one file, not {len(names)}")
    device = options.get("device", "default")
    if node == "TripleCLIPLoader" and device != "default":
        raise ValueError("three text encoders load through ComfyUI's TripleCLIPLoader, which has no device "
                         f"input; use device 'default', not {device!r}")
    wanted = {name: options.get(name, default) for name, default in _OPTIONS.get(node, {}).items()}
    return NodeCall.of(node, {**dict(zip(files, names)), **wanted})


def default_cache_key(kind: ModelKind, names: Sequence[str], options: Mapping[str, str]) -> str:
    """``kind:file[+file][opt=value,...]`` with the names as ComfyUI lists them; defaults left out."""
    shown = [f"{k}={v}" for k, v in sorted(options.items()) if v not in ("default", "")]
    return f"{kind.value}:{'+'.join(names)}" + (f"[{','.join(shown)}]" if shown else "")


@dataclass(frozen=True)
class Load:
    """What a node or a config entry asks to load.

    ``name`` is the default cache key, made from what was asked for: a node's inputs as given
    (its recipe has them checked, with defaults filled in), a text encoder's type as given
    (TripleCLIPLoader takes none). ``files``: the model files named, looked up in the kind's
    folders; a node called by id names none here (its files are found among its checked inputs).
    """

    kind: ModelKind
    call: NodeCall
    name: str
    files: tuple[str, ...] = ()

    @classmethod
    def loader(cls, kind: ModelKind, names: Sequence[str], options: Mapping[str, str] | None = None) -> Load:
        """ComfyUI's own loader for ``kind`` (what the config's sections and MemKit's loader nodes are sugar for)."""
        options = options or {}
        return cls(kind, loader_call(kind, names, options), default_cache_key(kind, names, options), tuple(names))

    @classmethod
    def node(cls, node_id: str, inputs: Mapping[str, Any]) -> Load:
        """Any loader node, called by its id with these inputs."""
        call = NodeCall.of(node_id, inputs)
        return cls(ModelKind.NODE, call, f"node:{node_id}(" + ",".join(f"{k}={v}" for k, v in call.inputs) + ")")


def shown_options(kind: ModelKind, call: NodeCall) -> dict[str, Any]:
    """A load's options as status shows them: the inputs of a kind's loader other than its files
    (as the config writes them); for a node called by id, the node and its inputs."""
    if kind is ModelKind.NODE:
        return {"node": call.node, "inputs": call.kwargs()}
    files = _FILE_INPUTS.get(call.node, ())
    return {name: value for name, value in call.inputs if name not in files}
