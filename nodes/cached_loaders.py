"""Drop-in replacements for ComfyUI's loaders that go through the MemKit cache."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..model_cache import comfy_models
from ..model_cache.loads import Load
from ..model_cache.recipe import ModelKind
from ..model_cache.service import get_service

log = logging.getLogger("memkit")

CATEGORY = "memkit/loaders"
NONE = comfy_models.NONE_NAME
LINKED = "linked-input"


def fingerprint(kind: ModelKind, names: list[str], options: dict[str, str] | None = None) -> str:
    """Per prompt, on the executing thread. Newer ComfyUI passes linked inputs as None: then the
    files are not known yet, so no entry is touched (ComfyUI keys on the upstream node instead)."""
    if any(n is None for n in names) or any(v is None for v in (options or {}).values()):
        return LINKED
    try:
        load = Load.loader(kind, names, options)
    except ValueError as error:  # a load ComfyUI's loaders cannot make (three text encoders on the cpu)
        return f"invalid:{error}"
    return get_service().fingerprint(load)


class MemKitCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemKitCheckpointLoader",
            display_name="Load Checkpoint (MemKit cached)",
            category=CATEGORY,
            description="Loads a checkpoint like Load Checkpoint, but from the MemKit cache: a checkpoint "
                        "loaded once (or preloaded at start-up) is handed out instantly.",
            inputs=[io.Combo.Input("ckpt_name", options=comfy_models.file_choices(ModelKind.CHECKPOINT),
                                   tooltip="The checkpoint file, from ComfyUI's checkpoints folders.")],
            outputs=[io.Model.Output(tooltip="The model used for denoising latents."),
                     io.Clip.Output(tooltip="The CLIP model used for encoding text prompts."),
                     io.Vae.Output(tooltip="The VAE used to decode latents into images.")],
        )

    @classmethod
    def fingerprint_inputs(cls, ckpt_name: str) -> str:
        return fingerprint(ModelKind.CHECKPOINT, [ckpt_name])

    @classmethod
    def execute(cls, ckpt_name: str) -> io.NodeOutput:
        return io.NodeOutput(*get_service().checkout(Load.loader(ModelKind.CHECKPOINT, [ckpt_name])))


def text_encoder_inputs() -> list[io.Input]:
    """The inputs of ComfyUI's CLIP loaders (one to three files, type, device), shared by the nodes
    that name text encoders."""
    names = comfy_models.file_choices(ModelKind.TEXT_ENCODER)
    return [
        io.Combo.Input("clip_name1", options=names, tooltip="The first text encoder file."),
        io.Combo.Input("clip_name2", options=[NONE, *names], default=NONE, optional=True,
                       tooltip="A second text encoder (e.g. CLIP-G for SDXL, T5 for Flux), or none."),
        io.Combo.Input("clip_name3", options=[NONE, *names], default=NONE, optional=True,
                       tooltip="A third text encoder (e.g. T5 for SD3), or none."),
        io.Combo.Input("type", options=list(comfy_models.clip_types()),
                       tooltip="The model family the encoders are for, as in ComfyUI's CLIP loaders."),
        io.Combo.Input("device", options=list(comfy_models.clip_devices()), default="default",
                       optional=True, tooltip="'cpu' keeps the text encoders on the CPU."),
    ]


def text_encoder_request(clip_name1: str | None, clip_name2: str | None, clip_name3: str | None, type: str,
                         device: str) -> tuple[list[str | None], dict[str, str]]:
    """The file names (none left out) and load options of a text-encoder node's inputs."""
    names = [n for n in (clip_name1, clip_name2, clip_name3) if n != NONE and n != ""]
    return names, {"type": type, "device": device}


class MemKitTextEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemKitTextEncoderLoader",
            display_name="Load Text Encoders (MemKit cached)",
            category=CATEGORY,
            description="Loads one, two or three text encoders like Load CLIP / DualCLIPLoader / "
                        "TripleCLIPLoader, from the MemKit cache.",
            inputs=text_encoder_inputs(),
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def fingerprint_inputs(cls, clip_name1: str, type: str, clip_name2: str = NONE, clip_name3: str = NONE,
                           device: str = "default") -> str:
        return fingerprint(ModelKind.TEXT_ENCODER, *text_encoder_request(clip_name1, clip_name2, clip_name3, type,
                                                                         device))

    @classmethod
    def execute(cls, clip_name1: str, type: str, clip_name2: str = NONE, clip_name3: str = NONE,
                device: str = "default") -> io.NodeOutput:
        return io.NodeOutput(*get_service().checkout(Load.loader(ModelKind.TEXT_ENCODER, *text_encoder_request(
            clip_name1, clip_name2, clip_name3, type, device))))


class MemKitDiffusionModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemKitDiffusionModelLoader",
            display_name="Load Diffusion Model (MemKit cached)",
            category=CATEGORY,
            description="Loads a diffusion model like Load Diffusion Model (UNETLoader), from the MemKit cache, "
                        "optionally with another attention implementation.",
            inputs=[
                io.Combo.Input("unet_name", options=comfy_models.file_choices(ModelKind.DIFFUSION_MODEL),
                               tooltip="The diffusion model file, from ComfyUI's diffusion_models folders."),
                io.Combo.Input("weight_dtype", options=list(comfy_models.weight_dtypes()),
                               tooltip="Weight storage type; fp8 halves memory at some quality cost."),
                io.Combo.Input("attention_mode", options=list(comfy_models.ATTENTION_MODES), default="default",
                               optional=True,
                               tooltip="default: what ComfyUI chose at start-up. sdpa: PyTorch's "
                                       "scaled_dot_product_attention. sage: SageAttention (needs the optional "
                                       "sageattention package and a CUDA GPU; otherwise a warning and the "
                                       "default). Applied to this model only; the weights are shared."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def fingerprint_inputs(cls, unet_name: str, weight_dtype: str, attention_mode: str = "default") -> str:
        key = fingerprint(ModelKind.DIFFUSION_MODEL, [unet_name], {"weight_dtype": weight_dtype})
        return key if attention_mode == "default" else f"{key}+attention={attention_mode}"

    @classmethod
    def execute(cls, unet_name: str, weight_dtype: str, attention_mode: str = "default") -> io.NodeOutput:
        model, = get_service().checkout(Load.loader(ModelKind.DIFFUSION_MODEL, [unet_name],
                                                    {"weight_dtype": weight_dtype}))
        apply_attention(model, attention_mode)
        return io.NodeOutput(model)


def apply_attention(model: object, mode: str) -> None:
    """Set the attention mode on a MODEL clone; an unavailable one is one warning per reason."""
    unavailable = comfy_models.set_attention(model, mode)
    if unavailable and unavailable not in _warned:
        _warned.add(unavailable)
        log.warning("[memkit] attention_mode %r is not available (%s); using ComfyUI's default attention",
                    mode, unavailable)


_warned: set[str] = set()


class MemKitVAELoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemKitVAELoader",
            display_name="Load VAE (MemKit cached)",
            category=CATEGORY,
            description="Loads a VAE like Load VAE, from the MemKit cache.",
            inputs=[io.Combo.Input("vae_name", options=comfy_models.file_choices(ModelKind.VAE),
                                   tooltip="The VAE file, from ComfyUI's vae folders (or a TAESD name).")],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def fingerprint_inputs(cls, vae_name: str) -> str:
        return fingerprint(ModelKind.VAE, [vae_name])

    @classmethod
    def execute(cls, vae_name: str) -> io.NodeOutput:
        load = Load.loader(ModelKind.VAE, [vae_name])
        if comfy_models.resolve(ModelKind.VAE, vae_name) is None:
            # taesd/pixel_space are assembled from several files by ComfyUI; not worth caching.
            return io.NodeOutput(*comfy_models.load(load.call, load.kind.kept_outputs).parts)
        return io.NodeOutput(*get_service().checkout(load))


NODES = [MemKitCheckpointLoader, MemKitTextEncoderLoader, MemKitDiffusionModelLoader, MemKitVAELoader]
