"""Tiled VAE decode: plan the tiles, decode them one by one, blend, hand back what VAEDecode would.

``tiled_decode`` is the one entry point (the node's). ``TiledVAEDecoder`` plans and decodes; how a
tile is decoded, and what the plan needs to know about that, is the method's class (``stages``);
every call into ComfyUI goes through ``comfy_models``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import comfy_models
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
from .stages import Method, method_for
from .synced import ParkLedger, SyncedKLDecoder

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Check = Callable[[], None]

PRECISIONS = ("precise", "fast")
"""precise: GroupNorm VAEs normalise every tile with whole-image statistics (layer-synchronous);
fast: every tile is decoded on its own (its own statistics)."""

MIN_RETRY_SIDE = 8
"""Smallest tile side (latent units) an out-of-memory retry goes down to before whole-model tiles."""

_split_checked: dict[tuple[str, str, str], bool] = {}
"""Per (VAE class, dtype, method): whether the split decoder matched ComfyUI's own decode."""

AUTO_OVERLAP_PIXELS = 64
"""Overlap `auto` keeps between tiles; the seam depends on overlap in pixels, not on tile size."""


@dataclass(frozen=True)
class DecodePlan:
    """What ``decode`` will do: ``grid`` None means one plain ``VAE.decode`` call (untiled)."""

    method: type[Method]
    grid: LatentGrid | None
    regions: tuple[Region, ...]
    recompute: float
    precise: bool = False

    @property
    def tiles(self) -> int:
        return len(self.regions)

    def describe(self) -> str:
        if self.grid is None:
            return f"untiled ({self.method.name})"
        sizes = "x".join(str(b - a) for a, b in self.regions[0])  # every tile has the same size
        overlaps = "x".join(str(t - s) for t, s in zip(self.grid.sizes, self.grid.strides))
        return (f"{self.tiles} tiles of {sizes} latent, overlap at least {overlaps} ({self.method.name}"
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


def tiled_decode(vae: Any, samples: torch.Tensor, settings: TileSettings | None,
                 precision: str = "precise") -> torch.Tensor:
    """Decode ``samples`` with ``vae`` as MemKitTiledVAEDecode does, wired to ComfyUI: load the VAE as
    VAEDecode would, plan (``settings`` None: ``auto``), decode with ComfyUI's progress bar and
    interrupt, retrying with smaller tiles on its out-of-memory error. Video frames come back as
    the batch, as VAEDecode returns them."""
    decoder = TiledVAEDecoder(vae, precision)
    shape = tuple(samples.shape)
    plan = decoder.plan(shape, settings, free_memory=decoder.prepare(shape))
    images = decoder.decode_with_retries(samples, plan, progress=comfy_models.progress_bar(plan.tiles * shape[0]),
                                         check=comfy_models.raise_if_interrupted,
                                         out_of_memory=comfy_models.is_out_of_memory)
    if images.ndim == 5:  # frames as the batch, as VAEDecode does
        images = images.reshape(-1, *images.shape[-3:])
    return images


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

    def method(self, samples_ndim: int) -> type[Method]:
        """How this VAE's latents of ``samples_ndim`` dimensions are decoded (see ``stages``)."""
        return method_for(self.model, samples_ndim)

    def _time_is_tiled(self, method: type[Method]) -> bool:
        return method.tiles_time and self.temporal_factor is not None

    def _precise(self, method: type[Method]) -> bool:
        return self.precision == "precise" and SyncedKLDecoder.supports(method(self.model))

    def plan(self, shape: tuple[int, ...], settings: TileSettings | None,
             free_memory: float | None = None, method: type[Method] | None = None) -> DecodePlan:
        """The plan for ``settings``, or for ``auto`` when settings is None: sized from ``free_memory``
        (default: what ComfyUI reports free on the VAE's device; see ``prepare``).

        A split method whose latent-resolution stage (run once on the whole latent) would not fit
        the free memory is replaced by whole-model tiles, which run that stage per tile.
        """
        method = method or self.method(len(shape))
        if free_memory is None:
            free_memory = comfy_models.free_memory(self.vae)
        latent_stage = self.latent_stage_memory(shape, method)
        if method.unsplit is not None and latent_stage > free_memory:
            log.info("MemKit tiled decode: the latent stage of %s needs about %.0f MB, more than the %.0f MB free; "
                     "decoding whole-model tiles", tuple(shape), latent_stage / 2**20, free_memory / 2**20)
            method = method.unsplit
        temporal = self.temporal_factor if self._time_is_tiled(method) else None
        if settings is None:
            grid = self._auto_grid(shape, method, free_memory)
        else:
            grid = latent_grid(settings, self.spatial_factor, temporal)
        if grid is None or fits_one_tile(shape, grid):
            return DecodePlan(method, None, ((),), 1.0)
        return DecodePlan(method, grid, tuple(plan_tiles(shape, grid)), recompute_factor(shape, grid),
                          precise=self._precise(method))

    def latent_stage_memory(self, shape: tuple[int, ...], method: type[Method]) -> float:
        """Bytes the latent-resolution stage of a split method needs on the whole latent, in the VAE's
        dtype (``Stages.latent_stage_memory``); 0 for a whole-model method, which has none."""
        dtype_size = torch.empty((), dtype=self.vae.vae_dtype).element_size()
        return method(self.model).latent_stage_memory(shape, dtype_size)

    def _memory_for(self, shape: tuple[int, ...], method: type[Method]) -> float:
        if method.frame_by_frame:  # one latent frame at a time: time barely adds memory
            shape = (*shape[:2], 1, *shape[3:])
        return float(self.vae.memory_used_decode((1, *shape[1:]), self.vae.vae_dtype))

    def _auto_grid(self, shape: tuple[int, ...], method: type[Method], free: float) -> LatentGrid | None:
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

    def _square_grid(self, shape: tuple[int, ...], method: type[Method], side: int, overlap: int) -> LatentGrid:
        sizes, strides = (side, side), (side - overlap, side - overlap)
        if self._time_is_tiled(method):
            sizes, strides = (shape[2], *sizes), (shape[2], *strides)
        return LatentGrid(sizes, strides)

    def prepare(self, shape: tuple[int, ...]) -> float:
        """Load the VAE on its decode device through ComfyUI, asking for room for an untiled decode
        (as VAEDecode does, so ComfyUI offloads other models first), and return the free memory
        there afterwards: what ``auto`` sizes tiles from."""
        comfy_models.load(self.vae, self._memory_for(shape, self.method(len(shape))))
        return comfy_models.free_memory(self.vae)

    # ---- checking the split against ComfyUI ---------------------------------------------------

    def split_matches_comfyui(self, method: type[Method], precise: bool) -> bool:
        """Once per VAE class, dtype and method: does our split decode give what ComfyUI's own
        decode gives on a tiny latent? If not (another ComfyUI version changed the model), the
        caller uses whole-model tiles, so the output can never silently change."""
        if method.unsplit is None:  # the whole model is ComfyUI's own decode
            return True
        key = (f"{type(self.model).__module__}.{type(self.model).__name__}", str(self.vae.vae_dtype),
               method.name + ("+precise" if precise else ""))
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

    def _check_split(self, method: type[Method], precise: bool) -> bool:
        shape = (1, self.vae.latent_channels, *method.check_size)
        latent = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(self.vae.vae_dtype)
        with torch.no_grad():
            latent = latent.to(self.vae.device)
            expected = self.model.decode(latent)
            stages = method(self.model)
            features = stages.latent_stage(latent)
            for variant in stages.variants():  # as it runs on large latents (KL: chunked split attention)
                if not self._close(variant.latent_stage(latent), features):
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
            plan = DecodePlan(plan.method.unsplit, plan.grid, plan.regions, plan.recompute)
        tiles = plan.regions
        all_axes = self._axes(samples.ndim)
        axes = all_axes[len(all_axes) - len(plan.grid.sizes):]  # the tiled ones are last
        weights = [axis_feathers([axis.out_span(region[i]) for region in tiles]) for i, axis in enumerate(axes)]
        out_shape = (1, vae.output_channels, *(axis.length(n) for axis, n in zip(all_axes, samples.shape[2:])))
        log.info("MemKit tiled decode of %s: %s", tuple(samples.shape), plan.describe())
        per_tile = SyncedKLDecoder(plan.method(self.model), vae.device, vae.device).ticks() if plan.precise else 1
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
        tiles = plan.regions
        if plan.precise:
            stages = plan.method(self.model)
            features = stages.latent_stage(latent)
            park = comfy_models.offload_device() if self.vae.device.type != "cpu" else self.vae.device
            synced = SyncedKLDecoder(stages, self.vae.device, park, check=check, ledger=self.ledger)
            owned = owned_regions(tuple(latent.shape), plan.grid, list(tiles))
            for index, decoded in synced.run(features, list(tiles), owned, progress=tick):
                yield tiles[index], decoded
            return
        decode_tile = plan.method(self.model).tile_decoder(latent)
        for region in tiles:
            check()
            window = (..., *(slice(a, b) for a, b in region))
            decoded = decode_tile(window)
            tick()
            yield region, decoded

    def decode_with_retries(self, samples: torch.Tensor, plan: DecodePlan, progress: Progress | None = None,
                            check: Check | None = None,
                            out_of_memory: Callable[[BaseException], bool] = lambda error: False,
                            ) -> torch.Tensor:
        """``decode``, and on an error ``out_of_memory`` says is one (ComfyUI's test) again with tiles of half
        the side, down to the smallest that keeps the 64-px overlap, then with whole-model tiles,
        saying so in the log: a decode that a smaller tile fits never fails.

        An untiled plan is ``VAE.decode``, which catches out-of-memory itself and decodes again with
        ComfyUI's own tiles; the error reaches this retry only when those run out of memory too
        (ComfyUI 0.3.75 runs them outside its ``try``), and the retry then starts from half the
        latent's longer side."""
        shape = tuple(samples.shape)
        attempts = 0
        while True:
            try:
                return self.decode(samples, plan, progress, check)
            except Exception as error:
                if not out_of_memory(error):
                    raise
                attempts += 1
                smaller = self._smaller(shape, plan)
                if smaller is None:
                    raise
                log.warning("MemKit tiled decode ran out of memory (%s) with %s; retrying with %s",
                            str(error).splitlines()[0][:200], plan.describe(), smaller.describe())
                comfy_models.empty_cache()
                plan = smaller
                if attempts > 16:
                    raise

    def _smaller(self, shape: tuple[int, ...], plan: DecodePlan) -> DecodePlan | None:
        """The plan to retry with after ``plan`` ran out of memory; None when nothing smaller is left."""
        overlap = max(1, to_latent(AUTO_OVERLAP_PIXELS, self.spatial_factor, "overlap"))
        # untiled: VAE.decode's own fallback tiles ran out of memory too (see decode_with_retries)
        side = min(plan.grid.sizes[-2:]) if plan.grid is not None else max(shape[-2:])
        smaller = max(side // 2, MIN_RETRY_SIDE, 2 * overlap + 1)
        if smaller < side:
            grid = self._square_grid(shape, plan.method, smaller, overlap)
            return DecodePlan(plan.method, grid, tuple(plan_tiles(shape, grid)), recompute_factor(shape, grid),
                              precise=plan.precise)
        whole = plan.method.unsplit
        if whole is None:  # already whole-model tiles at the smallest side: nothing smaller to try
            return None
        grid = self._square_grid(shape, whole, max(side, 2 * overlap + 1), overlap)
        return DecodePlan(whole, grid, tuple(plan_tiles(shape, grid)), recompute_factor(shape, grid))

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

    def _load(self, shape: tuple[int, ...], first_tile: tuple, method: type[Method]) -> None:
        """Put the VAE on its decode device through ComfyUI, asking for one tile's worth of memory."""
        tile_shape = (*shape[:len(shape) - len(first_tile)], *(b - a for a, b in first_tile))
        comfy_models.load(self.vae, self._memory_for(tile_shape, method))
