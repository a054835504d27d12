"""MemKitTiledVAEDecode: a drop-in for VAEDecode that decodes tile by tile (logic in vae_tiling/)."""

from __future__ import annotations

from comfy_api.latest import io

from ..vae_tiling.decode import PRECISIONS, tiled_decode
from ..vae_tiling.plan import TileSettings, TileSettingsError, validate_pixel_settings

DEFAULTS = TileSettings()
SPATIAL_TOOLTIP = ("{what} in output pixels; rounded to the VAE's compression factor (8 for SD/SDXL/Flux and Wan 2.1, "
                   "16 for Wan 2.2).")


def _int(name: str, default: int, tooltip: str, minimum: int = 8, step: int = 8) -> io.Int.Input:
    return io.Int.Input(name, default=default, min=minimum, max=8192, step=step, tooltip=tooltip)


class MemKitTiledVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MemKitTiledVAEDecode",
            display_name="Tiled VAE Decode (MemKit)",
            category="memkit/latent",
            description="Decodes latents tile by tile so the peak memory follows the tile, not the image. The "
                        "latent-resolution part of SD-style VAEs (including the middle attention) runs once over "
                        "the whole image; Wan video tiles keep the causal cache over every frame. Latents that fit "
                        "in one tile decode exactly as VAEDecode. Output: frames as the batch, like VAEDecode.",
            inputs=[
                io.Latent.Input("samples", tooltip="The latent to decode (image or video)."),
                io.Vae.Input("vae", tooltip="The VAE to decode with."),
                _int("tile_x", DEFAULTS.tile_x, SPATIAL_TOOLTIP.format(what="Tile width")),
                _int("tile_y", DEFAULTS.tile_y, SPATIAL_TOOLTIP.format(what="Tile height")),
                _int("tile_stride_x", DEFAULTS.stride_x, "Horizontal step between tiles, in pixels; "
                     "tile_x - tile_stride_x is the least overlap that is blended. The image gets as many tiles "
                     "as this step gives, evenly spaced, shrunk to the smallest width that keeps that overlap."),
                _int("tile_stride_y", DEFAULTS.stride_y, "Vertical step between tiles, in pixels; "
                     "tile_y - tile_stride_y is the least overlap that is blended (tiles shrunk the same way)."),
                _int("temporal_size", DEFAULTS.tile_t, "Video VAEs that decode a whole clip at once: frames per "
                     "chunk. Not used for image VAEs, nor for Wan, whose tiles run over every frame.",
                     minimum=4, step=4),
                _int("temporal_stride", DEFAULTS.stride_t, "Frames between chunk starts (temporal_size - "
                     "temporal_stride frames are blended).", minimum=1, step=1),
                io.Boolean.Input("auto", default=True, tooltip="On (default): ignore the tile settings; decode "
                                 "untiled when ComfyUI's estimate fits the free memory of the VAE's device (measured "
                                 "after loading it), else the largest square tiles that fit, with 64 px of overlap. "
                                 "Off: the tile and stride inputs."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="precise", optional=True,
                               tooltip="precise (default): for GroupNorm VAEs (SD, SDXL, SD3, Flux) every tile is "
                                       "normalised with the whole image's statistics, so tiles match the untiled "
                                       "decode (no seams); costs a little time for the statistics and keeps all "
                                       "tiles' activations parked on the offload device (CPU RAM) between layers. "
                                       "fast: each tile on its own with its own statistics; nothing parked, but "
                                       "visible seams on some VAEs. Wan's VAE has no GroupNorm: both are the same."),
            ],
            outputs=[io.Image.Output(tooltip="The decoded images; video frames are the batch.")],
        )

    @classmethod
    def validate_inputs(cls, tile_x: int, tile_y: int, tile_stride_x: int, tile_stride_y: int, temporal_size: int,
                        temporal_stride: int) -> bool | str:
        try:
            validate_pixel_settings(TileSettings(tile_x, tile_y, tile_stride_x, tile_stride_y, temporal_size,
                                                 temporal_stride))
        except TileSettingsError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, samples: dict, vae, tile_x: int, tile_y: int, tile_stride_x: int, tile_stride_y: int,
                temporal_size: int, temporal_stride: int, auto: bool, precision: str = "precise") -> io.NodeOutput:
        settings = None if auto else TileSettings(tile_x, tile_y, tile_stride_x, tile_stride_y, temporal_size,
                                                  temporal_stride)
        return io.NodeOutput(tiled_decode(vae, samples["samples"], settings, precision))


NODES = [MemKitTiledVAEDecode]
