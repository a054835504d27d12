"""CLIPTextEncode with its outputs cached (logic in model_cache/conditioning.py and service.py).

``MemKitTextEncode`` takes a CLIP like CLIPTextEncode; ``MemKitTextEncodeByName`` takes the text
encoder's files instead, so a cached conditioning is returned without loading the encoder at all.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..model_cache.loads import Load
from ..model_cache.recipe import ModelKind
from ..model_cache.service import get_service
from .cached_loaders import NONE, text_encoder_inputs, text_encoder_request


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


class MemKitTextEncodeByName(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemKitTextEncodeByName",
            display_name="Text Encode by Encoder Name (MemKit cached)",
            category="memkit/conditioning",
            description="Encodes a prompt with the text encoder these files make, exactly as Load CLIP + CLIP Text "
                        "Encode would. When this text was encoded before with the same files (in RAM, or on disk "
                        "from an earlier run), the encoder is not loaded at all: for a 5-11 GB umt5-xxl that is "
                        "the whole load time. On a miss the encoder loads through the MemKit cache.",
            inputs=[*text_encoder_inputs(),
                    io.String.Input("text", multiline=True, dynamic_prompts=True, tooltip="The text to encode.")],
            outputs=[io.Conditioning.Output(tooltip="The same conditioning CLIP Text Encode returns.")],
        )

    @classmethod
    def fingerprint_inputs(cls, clip_name1: str, type: str, text: str, clip_name2: str = NONE,
                           clip_name3: str = NONE, device: str = "default") -> str:
        """The encoder files' identity: a file replaced on disk re-runs the node."""
        try:
            load = Load.loader(ModelKind.TEXT_ENCODER, *text_encoder_request(clip_name1, clip_name2, clip_name3, type,
                                                                             device))
            return get_service().recipe(load).key
        except (OSError, ValueError) as error:
            return f"missing:{error}"

    @classmethod
    def execute(cls, clip_name1: str, type: str, text: str, clip_name2: str = NONE, clip_name3: str = NONE,
                device: str = "default") -> io.NodeOutput:
        load = Load.loader(ModelKind.TEXT_ENCODER, *text_encoder_request(clip_name1, clip_name2, clip_name3, type,
                                                                         device))
        return io.NodeOutput(get_service().encode_by_name(load, text))


NODES = [MemKitTextEncode, MemKitTextEncodeByName]
