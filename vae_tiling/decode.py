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
    owned_regions,
    plan_tiles,
    recompute_factor,
    to_latent,
)
from .stages import ATTENTION_SCORE_BYTES, KLStages, WanStages, is_frame_causal, split_attention
from .synced import ParkLedger, SyncedKLDecoder

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Check = Callable[[], None]

PRECISIONS = ("precise", "fast")
"""precise: GroupNorm VAEs normalise every tile with whole-image statistics (layer-synchronous);
fast: every tile is decoded on its own (its own statistics)."""

LATENT_STAGE_BYTES_PER_ELEMENT = 10
"""Working memory of a split decoder's latent-resolution stage, per element of its widest
activation (the middle block's ResNet temporaries and attention output, in the VAE's dtype)."""

MIN_RETRY_SIDE = 8
"""Smallest tile side (latent units) an out-of-memory retry goes down to before whole-model tiles."""

UNSPLIT = {"kl-staged": "whole-model", "wan-staged": "frame-causal"}
"""For each split method, the whole-model method that runs the same tiles without the split."""

_split_checked: dict[tuple[str, str, str], bool] = {}
"""Per (VAE class, dtype, method): whether the split decoder matched ComfyUI's own decode."""

AUTO_OVERLAP_PIXELS = 64
"""Overlap `auto` keeps between tiles; the seam depends on overlap in pixels, not on tile size."""


@dataclass(frozen=True)
class DecodePlan:
    """What ``decode`` will do: ``grid`` None means one plain ``VAE.decode`` call (untiled)."""

    method: str
    grid: LatentGrid | None
    regions: tuple[Region, ...]
    recompute: float
    precise: bool = False

    @property
    def tiles(self) -> int:
        return len(self.regions)

    def describe(self) -> str:
        if self.grid is None:
            return f"untiled ({self.method})"
        sizes = "x".join(str(b - a) for a, b in self.regions[0])  # every tile has the same size
        overlaps = "x".join(str(t - s) for t, s in zip(self.grid.sizes, self.grid.strides))
        return (f"{self.tiles} tiles of {sizes} latent, overlap at least {overlaps} ({self.method}"
                f"{', precise' if self.precise else ''}); each position decoded {self.recompute:.2f}x on average")


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

    def __init__(self, vae: Any, precision: str = "precise") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        self.vae = vae
        self.model = vae.first_stage_model
        self.precision = precision
        self.spatial_factor = int(vae.spacial_compression_decode())
        self.temporal_factor = vae.temporal_compression_decode()
        self.ledger = ParkLedger()

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

    def _precise(self, method: str) -> bool:
        return self.precision == "precise" and method == "kl-staged" and SyncedKLDecoder.supports(KLStages(self.model))

    def plan(self, shape: tuple[int, ...], settings: TileSettings | None,
             free_memory: float | None = None, method: str | None = None) -> DecodePlan:
        """The plan for ``settings``, or for ``auto`` when settings is None: sized from ``free_memory``
        (default: what ComfyUI reports free on the VAE's device; see ``prepare``).

        A split method whose latent-resolution stage (run once on the whole latent) would not fit
        the free memory is replaced by whole-model tiles, which run that stage per tile.
        """
        method = method or self.method(len(shape))
        if free_memory is None:
            from comfy import model_management

            free_memory = model_management.get_free_memory(self.vae.device)
        latent_stage = self.latent_stage_memory(shape, method)
        if latent_stage > free_memory:
            log.info("MemKit tiled decode: the latent stage of %s needs about %.0f MB, more than the %.0f MB free; "
                     "decoding whole-model tiles", tuple(shape), latent_stage / 2**20, free_memory / 2**20)
            method = UNSPLIT[method]
        temporal = self.temporal_factor if self._time_is_tiled(method) else None
        if settings is None:
            grid = self._auto_grid(shape, method, free_memory)
        else:
            grid = latent_grid(settings, self.spatial_factor, temporal)
        if grid is None or fits_one_tile(shape, grid):
            return DecodePlan(method, None, ((),), 1.0)
        return DecodePlan(method, grid, tuple(plan_tiles(shape, grid)), recompute_factor(shape, grid),
                          precise=self._precise(method))

    def latent_stage_memory(self, shape: tuple[int, ...], method: str) -> float:
        """Bytes the latent-resolution stage of a split decoder needs on the whole latent: its widest
        activation times ``LATENT_STAGE_BYTES_PER_ELEMENT`` (Wan: one frame at a time, but the
        features of every frame are kept for the tiles), plus the attention scores it holds at once."""
        if method not in ("kl-staged", "wan-staged"):
            return 0.0
        decoder = self.model.decoder
        channels = (decoder.conv_in if method == "kl-staged" else decoder.conv1).out_channels
        dtype_size = torch.empty((), dtype=self.vae.vae_dtype).element_size()
        frame = shape[-1] * shape[-2] * channels * dtype_size
        frames = shape[2] if method == "wan-staged" else 1
        attention = ATTENTION_SCORE_BYTES if method == "kl-staged" else 0  # at most, where it is split attention
        return float(frame * (LATENT_STAGE_BYTES_PER_ELEMENT + frames) + attention)

    def _memory_for(self, shape: tuple[int, ...], method: str) -> float:
        if method in ("frame-causal", "wan-staged"):  # one latent frame at a time: time barely adds memory
            shape = (*shape[:2], 1, *shape[3:])
        return float(self.vae.memory_used_decode((1, *shape[1:]), self.vae.vae_dtype))

    def _auto_grid(self, shape: tuple[int, ...], method: str, free: float) -> LatentGrid | None:
        """Untiled when the whole latent fits in free memory, else the largest square tiles that fit
        beside the latent stage's output (kept for every tile of a split decoder)."""
        if self._memory_for(shape, method) <= free:
            return None
        free = max(0.0, free - self.latent_stage_memory(shape, method))
        overlap = max(1, to_latent(AUTO_OVERLAP_PIXELS, self.spatial_factor, "overlap"))
        height, width = shape[-2:]
        side = max(height, width)
        while side > 2 * overlap:
            tile_shape = (*shape[:-2], min(side, height), min(side, width))
            if self._memory_for(tile_shape, method) <= free:
                break
            side = math.ceil(side * 0.85) if side > 16 else side - 1
        side = max(side, 2 * overlap + 1)
        return self._square_grid(shape, method, side, overlap)

    def _square_grid(self, shape: tuple[int, ...], method: str, side: int, overlap: int) -> LatentGrid:
        sizes, strides = (side, side), (side - overlap, side - overlap)
        if self._time_is_tiled(method):
            sizes, strides = (shape[2], *sizes), (shape[2], *strides)
        return LatentGrid(sizes, strides)

    def prepare(self, shape: tuple[int, ...]) -> float:
        """Load the VAE on its decode device through ComfyUI, asking for room for an untiled decode
        (as VAEDecode does, so ComfyUI offloads other models first), and return the free memory
        there afterwards: what ``auto`` sizes tiles from."""
        from comfy import model_management

        untiled = self._memory_for(shape, self.method(len(shape)))
        model_management.load_models_gpu([self.vae.patcher], memory_required=untiled,
                                         force_full_load=self.vae.disable_offload)
        return model_management.get_free_memory(self.vae.device)

    # ---- checking the split against ComfyUI ---------------------------------------------------

    def split_matches_comfyui(self, method: str, precise: bool) -> bool:
        """Once per VAE class, dtype and method: does our split decode give what ComfyUI's own
        decode gives on a tiny latent? If not (another ComfyUI version changed the model), the
        caller uses whole-model tiles, so the output can never silently change."""
        if method not in ("kl-staged", "wan-staged"):
            return True
        key = (f"{type(self.model).__module__}.{type(self.model).__name__}", str(self.vae.vae_dtype),
               method + ("+precise" if precise else ""))
        if key not in _split_checked:
            try:
                _split_checked[key] = self._check_split(method, precise)
            except Exception as error:  # a split that cannot even run on this ComfyUI
                log.warning("MemKit tiled decode: the split decoder fails on %s (%s: %s)", key[0],
                            type(error).__name__, error)
                _split_checked[key] = False
            if not _split_checked[key]:
                log.warning("MemKit tiled decode: the split %s decoder differs from ComfyUI's decode of %s on this "
                            "ComfyUI version; using whole-model tiles for it", key[2], key[0])
        return _split_checked[key]

    def _check_split(self, method: str, precise: bool) -> bool:
        channels = self.vae.latent_channels
        shape = (1, channels, 8, 8) if method == "kl-staged" else (1, channels, 2, 4, 4)
        latent = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(self.vae.vae_dtype)
        with torch.no_grad():
            latent = latent.to(self.vae.device)
            expected = self.model.decode(latent)
            stages = KLStages(self.model) if method == "kl-staged" else WanStages(self.model)
            features = stages.latent_stage(latent)
            if method == "kl-staged" and split_attention(self.model.decoder.mid.attn_1):
                # the chunked split attention too (large latents only): here a chunk per query
                chunked = KLStages(self.model, attention_score_bytes=1).latent_stage(latent)
                if not self._close(chunked, features):
                    return False
            if not precise:
                return bool(torch.equal(stages.upsampling_stage(features), expected))
            synced = SyncedKLDecoder(stages, self.vae.device, self.vae.device)
            whole = ((0, shape[-2]), (0, shape[-1]))
            (_, got), = synced.run(features, [whole], [whole])
        return self._close(got, expected)

    def _close(self, got: torch.Tensor, expected: torch.Tensor) -> bool:
        """Equal up to rounding in the VAE's dtype (relative to the largest value)."""
        tolerance = 1e-3 if self.vae.vae_dtype == torch.float32 else 3e-2
        return bool((got.float() - expected.float()).abs().max() <= tolerance * max(1.0, expected.abs().max().item()))

    # ---- decoding ----------------------------------------------------------------------------

    def decode(self, samples: torch.Tensor, plan: DecodePlan, progress: Progress | None = None,
               check: Check | None = None) -> torch.Tensor:
        """Decode ``samples`` as ``plan`` says; returns channels-last like ``VAE.decode``.

        ``check`` is called between tiles (ComfyUI's interrupt: it raises to stop).
        """
        vae = self.vae
        vae.throw_exception_if_invalid()
        check = check or (lambda: None)
        if plan.grid is None:
            images = vae.decode(samples)
            if progress:
                progress(1, 1)
            return images
        self._load(tuple(samples.shape), plan.regions[0], plan.method)
        if not self.split_matches_comfyui(plan.method, plan.precise):
            plan = DecodePlan(UNSPLIT[plan.method], plan.grid, plan.regions, plan.recompute)
        tiles = plan.regions
        all_axes = self._axes(samples.ndim)
        axes = all_axes[len(all_axes) - len(plan.grid.sizes):]  # the tiled ones are last
        weights = [axis_feathers([axis.out_span(region[i]) for region in tiles]) for i, axis in enumerate(axes)]
        out_shape = (1, vae.output_channels, *(axis.length(n) for axis, n in zip(all_axes, samples.shape[2:])))
        log.info("MemKit tiled decode of %s: %s", tuple(samples.shape), plan.describe())
        per_tile = SyncedKLDecoder(KLStages(self.model), vae.device, vae.device).ticks() if plan.precise else 1
        counter = {"done": 0, "total": len(tiles) * samples.shape[0] * per_tile}

        def tick() -> None:
            counter["done"] += 1
            if progress:
                progress(counter["done"], counter["total"])

        results = []
        with torch.no_grad():
            for index in range(samples.shape[0]):
                latent = samples[index:index + 1].to(vae.vae_dtype).to(vae.device)
                accumulator = BlendAccumulator(out_shape, len(axes), vae.output_device)
                for region, decoded in self._decoded_tiles(latent, plan, check, tick):
                    decoded = decoded.to(vae.output_device).float()
                    out_region = [axis.out_span(span) for axis, span in zip(axes, region)]
                    accumulator.add(decoded, out_region, [w[s] for w, s in zip(weights, out_region)])
                    del decoded
                results.append(vae.process_output(accumulator.finish()))
        images = results[0] if len(results) == 1 else torch.cat(results)
        return images.movedim(1, -1)

    def _decoded_tiles(self, latent: torch.Tensor, plan: DecodePlan, check: Check,
                       tick: Callable[[], None]) -> Any:
        """(region, decoded tile) for every tile of the plan, one at a time."""
        from comfy import model_management

        tiles = plan.regions
        if plan.precise:
            stages = KLStages(self.model)
            features = stages.latent_stage(latent)
            park = model_management.vae_offload_device() if self.vae.device.type != "cpu" else self.vae.device
            synced = SyncedKLDecoder(stages, self.vae.device, park, check=check, ledger=self.ledger)
            owned = owned_regions(tuple(latent.shape), plan.grid, list(tiles))
            for index, decoded in synced.run(features, list(tiles), owned, progress=tick):
                yield tiles[index], decoded
            return
        decode_tile = self._tile_decoder(latent, plan.method)
        for region in tiles:
            check()
            window = (..., *(slice(a, b) for a, b in region))
            decoded = decode_tile(window)
            tick()
            yield region, decoded

    def decode_with_retries(self, samples: torch.Tensor, plan: DecodePlan, progress: Progress | None = None,
                            check: Check | None = None,
                            out_of_memory: tuple[type[BaseException], ...] = ()) -> torch.Tensor:
        """``decode``, and on ``out_of_memory`` (ComfyUI's ``OOM_EXCEPTION``) again with tiles of half
        the side, down to the smallest that keeps the 64-px overlap, then with whole-model tiles,
        saying so in the log:
        as ComfyUI's own VAE decode falls back to tiling, a decode a smaller tile fits never fails."""
        shape = tuple(samples.shape)
        attempts = 0
        while True:
            try:
                return self.decode(samples, plan, progress, check)
            except out_of_memory as error:
                attempts += 1
                smaller = self._smaller(shape, plan)
                if smaller is None:
                    raise
                log.warning("MemKit tiled decode ran out of memory (%s) with %s; retrying with %s",
                            str(error).splitlines()[0][:200], plan.describe(), smaller.describe())
                self._free_after_oom()
                plan = smaller
                if attempts > 16:
                    raise

    def _smaller(self, shape: tuple[int, ...], plan: DecodePlan) -> DecodePlan | None:
        overlap = max(1, to_latent(AUTO_OVERLAP_PIXELS, self.spatial_factor, "overlap"))
        side = min(plan.grid.sizes[-2:]) if plan.grid is not None else max(shape[-2:])
        smaller = max(side // 2, MIN_RETRY_SIDE, 2 * overlap + 1)
        if smaller < side:
            grid = self._square_grid(shape, plan.method, smaller, overlap)
            return DecodePlan(plan.method, grid, tuple(plan_tiles(shape, grid)), recompute_factor(shape, grid),
                              precise=plan.precise)
        whole = UNSPLIT.get(plan.method)
        if whole is None:  # already whole-model tiles at the smallest side: nothing smaller to try
            return None
        grid = self._square_grid(shape, whole, max(side, 2 * overlap + 1), overlap)
        return DecodePlan(whole, grid, tuple(plan_tiles(shape, grid)), recompute_factor(shape, grid))

    @staticmethod
    def _free_after_oom() -> None:
        from comfy import model_management

        model_management.soft_empty_cache()

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
