"""Selectors: pick a preloaded model by its cache key instead of by file name."""

from __future__ import annotations

from comfy_api.latest import io

from ..model_cache.recipe import ModelKind
from ..model_cache.service import get_service

CATEGORY = "memkit/preloaded"
NO_ENTRIES = "(no preloaded entries)"


def _keys(kind: ModelKind) -> list[str]:
    return list(get_service().cache_keys.known(kind)) or [NO_ENTRIES]


def _selector(kind: ModelKind, node_id: str, display: str, outputs: list[io.Output]) -> type[io.ComfyNode]:
    class Selector(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id=node_id,
                display_name=display,
                category=CATEGORY,
                description=f"Hands out a {kind.value.replace('_', ' ')} preloaded by MemKit (from "
                            "preload_config.json) by its cache key. A key that is not loaded yet is loaded now.",
                inputs=[io.Combo.Input("cache_key", options=_keys(kind),
                                       tooltip="The cache_key of a preload_config.json entry (or of a model "
                                               "loaded since start-up).")],
                outputs=outputs,
            )

        @classmethod
        def fingerprint_inputs(cls, cache_key: str) -> str:
            return get_service().cache_key_fingerprint(kind, cache_key)

        @classmethod
        def execute(cls, cache_key: str) -> io.NodeOutput:
            return io.NodeOutput(*get_service().checkout_by_cache_key(kind, cache_key))

    Selector.__name__ = Selector.__qualname__ = node_id
    return Selector


MemKitCheckpointSelector = _selector(
    ModelKind.CHECKPOINT, "MemKitCheckpointSelector", "Preloaded Checkpoint (MemKit)",
    [io.Model.Output(), io.Clip.Output(), io.Vae.Output()])
MemKitTextEncoderSelector = _selector(
    ModelKind.TEXT_ENCODER, "MemKitTextEncoderSelector", "Preloaded Text Encoders (MemKit)", [io.Clip.Output()])
MemKitDiffusionModelSelector = _selector(
    ModelKind.DIFFUSION_MODEL, "MemKitDiffusionModelSelector", "Preloaded Diffusion Model (MemKit)",
    [io.Model.Output()])
MemKitVAESelector = _selector(ModelKind.VAE, "MemKitVAESelector", "Preloaded VAE (MemKit)", [io.Vae.Output()])

NODES = [MemKitCheckpointSelector, MemKitTextEncoderSelector, MemKitDiffusionModelSelector, MemKitVAESelector]
