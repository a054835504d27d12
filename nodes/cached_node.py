"""MemKitCachedNode: any loader node's outputs from the MemKit cache (audio encoders, CLIP vision,
upscalers, third-party loaders).

It hands out a ``nodes`` entry of preload_config.json by cache key, or calls a node by id with
the given inputs (loaded on first use, then cached). One node serves every loader, so its outputs
are typed ``*`` and carry, in order, whatever the original node returns: ComfyUI accepts them on
any input and the link takes the original type's place.
"""

from __future__ import annotations

import json

from comfy_api.latest import io

from ..model_cache.loads import Load
from ..model_cache.recipe import ModelKind
from ..model_cache.service import get_service

OUTPUTS = 4
NO_ENTRIES = "(no node entries)"


def _keys() -> list[str]:
    return list(get_service().cache_keys.known(ModelKind.NODE)) or [NO_ENTRIES]


def _request(cache_key: str, node_id: str, inputs_json: str) -> tuple[str | None, Load | None]:
    """(cache key, None) for a cache-key pick, or (None, the load) for a node called by id."""
    if not node_id.strip():
        return cache_key, None
    try:
        inputs = json.loads(inputs_json or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"MemKitCachedNode: inputs_json is not valid JSON (line {error.lineno}: "
                         f"{error.msg})") from None
    if not isinstance(inputs, dict):
        raise ValueError("MemKitCachedNode: inputs_json must be a JSON object of input name to value")
    return None, Load.node(node_id.strip(), inputs)


class MemKitCachedNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemKitCachedNode",
            display_name="Cached Loader Node (MemKit)",
            category="memkit/preloaded",
            description="The outputs of any loader node (audio encoder, CLIP vision, upscale model, a third-party "
                        "loader) from the MemKit cache: a 'nodes' entry of preload_config.json by cache key, or "
                        "node_id + inputs_json, loaded on first use and cached. Outputs are in the original node's "
                        "order. Models with clone() (MODEL, CLIP, VAE, CLIP vision, audio encoder) are handed out as "
                        "copies; other objects (e.g. upscale models) are shared, as /memkit/status shows.",
            inputs=[
                io.Combo.Input("cache_key", options=_keys(),
                               tooltip="The cache_key of a 'nodes' entry in preload_config.json (or of a node load "
                                       "made since start-up). Ignored when node_id is set."),
                io.String.Input("node_id", default="", optional=True,
                                tooltip="Call this loader node instead (its id, e.g. CLIPVisionLoader), with "
                                        "inputs_json; cached by node id, inputs and the files they name."),
                io.String.Input("inputs_json", default="{}", multiline=True, optional=True,
                                tooltip='The loader\'s widget values as JSON, e.g. {"clip_name": '
                                        '"clip_vision_h.safetensors"}; left-out inputs take their defaults.'),
            ],
            outputs=[io.AnyType.Output(f"output_{n}", display_name=f"output {n}",
                                       tooltip=f"Output {n} of the loader node (as its own output {n}).")
                     for n in range(1, OUTPUTS + 1)],
        )

    @classmethod
    def fingerprint_inputs(cls, cache_key: str, node_id: str = "", inputs_json: str = "{}") -> str:
        try:
            named, load = _request(cache_key, node_id, inputs_json)
        except ValueError as error:
            return f"invalid:{error}"
        service = get_service()
        if load is None:
            return service.cache_key_fingerprint(ModelKind.NODE, named)
        return service.fingerprint(load)

    @classmethod
    def execute(cls, cache_key: str, node_id: str = "", inputs_json: str = "{}") -> io.NodeOutput:
        named, load = _request(cache_key, node_id, inputs_json)
        service = get_service()
        parts = service.checkout_by_cache_key(ModelKind.NODE, named) if load is None else service.checkout(load)
        if len(parts) > OUTPUTS:
            raise ValueError(f"MemKitCachedNode: {named or node_id} returns {len(parts)} outputs; this node has "
                             f"{OUTPUTS}")
        return io.NodeOutput(*parts, *([None] * (OUTPUTS - len(parts))))


NODES = [MemKitCachedNode]
