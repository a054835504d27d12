"""Tiled VAE decode: plan the tiles, decode them one by one, blend, hand back what VAEDecode would."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .blend import BlendAccumulator, axis_feathers
from .plan import (
    LatentGrid,
    Region,
    TileSettings,
    fits_one_tile,
    latent_grid,
    plan_tiles,
    recompute_factor,
    to_latent,
)
from .stages import KLStages, WanStages, is_frame_causal

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

AUTO_OVERLAP_PIXELS = 64
"""Overlap `auto` keeps between tiles; the seam depends on overlap in pixels, not on tile size."""


@dataclass(frozen=True)
class DecodePlan:
    """What ``decode`` will do: ``grid`` None means one plain ``VAE.decode`` call (untiled)."""

    method: str
    grid: LatentGrid | None
    regions: tuple[Region, ...]
    recompute: float

    @property
    def tiles(self) -> int:
        return len(self.regions)

    def describe(self) -> str:
        if self.grid is None:
            return f"untiled ({self.method})"
        sizes = "x".join(map(str, self.grid.sizes))
        strides = "x".join(map(str, self.grid.strides))
        return (f"{self.tiles} tiles of {sizes} latent, stride {strides} ({self.method}); "
                f"each position decoded {self.recompute:.2f}x on average")


class _Axis:
    """Maps latent positions and lengths to output ones on one axis."""

    def __init__(self, length: Callable[[int], int], position: Callable[[int], int]) -> None:
        self.length, self.position = length, position

    def out_span(self, span: tuple[int, int]) -> tuple[int, int]:
        start = self.position(span[0])
        return start, start + self.length(span[1] - span[0])


def _scale(ratio: Any) -> Callable[[int], int]:
    return (lambda n: round(ratio(n))) if callable(ratio) else (lambda n: round(n * ratio))


class TiledVAEDecoder:
    """Tiled decode for one ComfyUI ``VAE`` object (duck-typed: uses its public attributes)."""

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        self.model = vae.first_stage_model
        self.spatial_factor = int(vae.spacial_compression_decode())
        self.temporal_factor = vae.temporal_compression_decode()

    # ---- planning ----------------------------------------------------------------------------

    def method(self, samples_ndim: int) -> str:
        if samples_ndim == 4:
            return "kl-staged" if KLStages.supports(self.model) else "whole-model"
        if samples_ndim == 5:
            if WanStages.supports(self.model):
                return "wan-staged"
            return "frame-causal" if is_frame_causal(self.model) else "volume"
        raise ValueError(f"samples must be a 4-D image latent or a 5-D video latent, got {samples_ndim}-D")

    def _time_is_tiled(self, method: str) -> bool:
        return method == "volume" and self.temporal_factor is not None

    def plan(self, shape: tuple[int, ...], settings: TileSettings | None,
             free_memory: float | None = None) -> DecodePlan:
        """The plan for ``settings``, or for ``auto`` when settings is None: sized from ``free_memory``
        (default: what ComfyUI reports free on the VAE's device)."""
        method = self.method(len(shape))
        temporal = self.temporal_factor if self._time_is_tiled(method) else None
        if settings is None:
            if free_memory is None:
                from comfy import model_management

                free_memory = model_management.get_free_memory(self.vae.device)
            grid = self._auto_grid(shape, method, free_memory)
        else:
            grid = latent_grid(settings, self.spatial_factor, temporal)
        if grid is None or fits_one_tile(shape, grid):
            return DecodePlan(method, None, ((),), 1.0)
        return DecodePlan(method, grid, tuple(plan_tiles(shape, grid)), recompute_factor(shape, grid))

    def _memory_for(self, shape: tuple[int, ...], method: str) -> float:
        if method in ("frame-causal", "wan-staged"):  # one latent frame at a time: time barely adds memory
            shape = (*shape[:2], 1, *shape[3:])
        return float(self.vae.memory_used_decode((1, *shape[1:]), self.vae.vae_dtype))

    def _auto_grid(self, shape: tuple[int, ...], method: str, free: float) -> LatentGrid | None:
        """Untiled when the whole latent fits in free memory, else the largest square tiles that fit."""
        if self._memory_for(shape, method) <= free:
            return None
        overlap = max(1, to_latent(AUTO_OVERLAP_PIXELS, self.spatial_factor, "overlap"))
        height, width = shape[-2:]
        side = max(height, width)
        while side > 2 * overlap:
            tile_shape = (*shape[:-2], min(side, height), min(side, width))
            if self._memory_for(tile_shape, method) <= free:
                break
            side = math.ceil(side * 0.85) if side > 16 else side - 1
        side = max(side, 2 * overlap + 1)
        sizes, strides = (side, side), (side - overlap, side - overlap)
        if self._time_is_tiled(method):
            sizes, strides = (shape[2], *sizes), (shape[2], *strides)
        return LatentGrid(sizes, strides)

    # ---- decoding ----------------------------------------------------------------------------

    def decode(self, samples: torch.Tensor, plan: DecodePlan, progress: Progress | None = None) -> torch.Tensor:
        """Decode ``samples`` as ``plan`` says; returns channels-last like ``VAE.decode``."""
        vae = self.vae
        vae.throw_exception_if_invalid()
        if plan.grid is None:
            images = vae.decode(samples)
            if progress:
                progress(1, 1)
            return images
        tiles = plan.regions
        self._load(tuple(samples.shape), tiles[0], plan.method)
        all_axes = self._axes(samples.ndim)
        axes = all_axes[len(all_axes) - len(plan.grid.sizes):]  # the tiled ones are last
        weights = [axis_feathers([axis.out_span(region[i]) for region in tiles]) for i, axis in enumerate(axes)]
        out_shape = (1, vae.output_channels, *(axis.length(n) for axis, n in zip(all_axes, samples.shape[2:])))
        log.info("MemKit tiled decode of %s: %s", tuple(samples.shape), plan.describe())
        done, total = 0, len(tiles) * samples.shape[0]
        results = []
        with torch.no_grad():
            for index in range(samples.shape[0]):
                latent = samples[index:index + 1].to(vae.vae_dtype).to(vae.device)
                decode_tile = self._tile_decoder(latent, plan.method)
                accumulator = BlendAccumulator(out_shape, len(axes), vae.output_device)
                for region in tiles:
                    window = (..., *(slice(a, b) for a, b in region))
                    decoded = decode_tile(window).to(vae.output_device).float()
                    out_region = [axis.out_span(span) for axis, span in zip(axes, region)]
                    accumulator.add(decoded, out_region, [w[s] for w, s in zip(weights, out_region)])
                    del decoded
                    done += 1
                    if progress:
                        progress(done, total)
                results.append(vae.process_output(accumulator.finish()))
        images = results[0] if len(results) == 1 else torch.cat(results)
        return images.movedim(1, -1)

    def _tile_decoder(self, latent: torch.Tensor, method: str) -> Callable[[tuple], torch.Tensor]:
        if method in ("kl-staged", "wan-staged"):
            stages = KLStages(self.model) if method == "kl-staged" else WanStages(self.model)
            features = stages.latent_stage(latent)
            return lambda window: stages.upsampling_stage(features[window])
        return lambda window: self.model.decode(latent[window])

    def _axes(self, ndim: int) -> list[_Axis]:
        """Output mapping for every latent axis after batch and channels."""
        ratio = self.vae.upscale_ratio
        spatial = _Axis(_scale(self.spatial_factor), _scale(self.spatial_factor))
        if ndim == 5:
            formula = self.vae.upscale_index_formula
            time_ratio = ratio[0] if isinstance(ratio, (tuple, list)) else ratio
            time_pos = formula[0] if formula is not None else time_ratio
            return [_Axis(_scale(time_ratio), _scale(time_pos)), spatial, spatial]
        return [spatial, spatial]

    def _load(self, shape: tuple[int, ...], first_tile: tuple, method: str) -> None:
        """Put the VAE on its decode device through ComfyUI, asking for one tile's worth of memory."""
        from comfy import model_management

        tile_shape = (*shape[:len(shape) - len(first_tile)], *(b - a for a, b in first_tile))
        model_management.load_models_gpu([self.vae.patcher], memory_required=self._memory_for(tile_shape, method),
                                         force_full_load=self.vae.disable_offload)
