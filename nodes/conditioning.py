"""MemKitTextEncode: CLIPTextEncode with its outputs cached (logic in model_cache/conditioning.py)."""

from __future__ import annotations

from comfy_api.latest import io

from ..model_cache.service import get_service


class MemKitTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemKitTextEncode",
            display_name="CLIP Text Encode (MemKit cached)",
            category="memkit/conditioning",
            description="Encodes a prompt exactly as CLIP Text Encode does, and remembers the result for this "
                        "text encoder and this exact text: in RAM, and on disk (across restarts) for text "
                        "encoders loaded through MemKit. Encoders with LoRA patches or hooks are always encoded "
                        "anew, so two encoder variants never share an embedding.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="The text to encode."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The same conditioning CLIP Text Encode returns.")],
        )

    @classmethod
    def execute(cls, clip, text: str) -> io.NodeOutput:
        if clip is None:
            raise RuntimeError("MemKitTextEncode: the clip input is None (the checkpoint has no text encoder?)")
        return io.NodeOutput(get_service().encode(clip, text))


NODES = [MemKitTextEncode]
