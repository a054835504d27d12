"""Every common VAE family: ComfyUI's VAELoader detects our seeded file, it decodes, and MemKit's
tiled decoder matches ``VAE.decode`` (exactly within one tile, closely when tiled).

The files come from the ``vaes`` fixture set (tests/fixtures/generate.py). Latents are small: the
whole module runs in about a minute on 2 CPU cores. One family's VAE is loaded at a time (the
fixture is module-scoped and parametrised, so pytest groups the tests by family and drops each
VAE before loading the next; ComfyUI keeps only weak references to it).

PSNR floors are the values measured on the CPU host, rounded down by at least 1 dB; a tiler that
misplaces, misweights or drops tiles lands far below them.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import pytest
import torch
from support.latents import structured_latent
from support.metrics import psnr

SEED = 20261201
log = logging.getLogger("memkit.test_vae_families")  # measurements: pytest --log-cli-level=INFO


@dataclass(frozen=True)
class Tiled:
    """A tiled decode: latent shape, tile settings (pixels/frames), tile count, PSNR floor (dB)."""

    shape: tuple[int, ...]
    settings: dict
    tiles: int
    floor: float


@dataclass(frozen=True)
class Family:
    file: str
    model: str  # the first-stage model class ComfyUI builds, module.Class
    latent_channels: int
    spatial: int
    temporal: int | None
    method: str  # what TiledVAEDecoder.method picks for this family's latents
    small: tuple[int, ...]  # a latent within one default tile
    out: tuple[int, ...]  # VAE.decode's output shape for `small`
    spatial_tiles: Tiled
    temporal_chunks: Tiled | None = None  # whole-clip video VAEs: chunked in time


SPATIAL_96 = {"tile_x": 96, "tile_y": 96, "stride_x": 64, "stride_y": 64}
SPATIAL_64 = {"tile_x": 64, "tile_y": 64, "stride_x": 32, "stride_y": 32}

# floors: measured PSNR in the comment, floor at least 1 dB below it
FAMILIES = {
    "sdxl": Family(
        "memkit-sdxl-vae.safetensors", "comfy.ldm.models.autoencoder.AutoencoderKL", 4, 8, None, "kl-staged",
        small=(1, 4, 8, 8), out=(1, 64, 64, 3),
        spatial_tiles=Tiled((1, 4, 16, 24), SPATIAL_96, tiles=6, floor=37.5)),  # 38.78 dB
    # SD3/Flux: no post_quant_conv, so ComfyUI builds an AutoencodingEngine; its Decoder is the same
    # 2-D Decoder as SD's, split the same way
    "flux": Family(
        "memkit-flux-vae.safetensors", "comfy.ldm.models.autoencoder.AutoencodingEngine", 16, 8, None,
        "kl-staged",
        small=(1, 16, 8, 8), out=(1, 64, 64, 3),
        spatial_tiles=Tiled((1, 16, 16, 24), SPATIAL_96, tiles=6, floor=37.5)),  # 38.89 dB (precise)
    # Wan 2.2's VAE is not comfy.ldm.wan.vae's WanVAE, so it is not split (WanStages) but frame-causal
    "wan22": Family(
        "memkit-wan22-vae.safetensors", "comfy.ldm.wan.vae2_2.WanVAE", 48, 16, 4, "frame-causal",
        small=(1, 48, 2, 4, 4), out=(1, 5, 64, 64, 3),
        spatial_tiles=Tiled((1, 48, 2, 4, 6), SPATIAL_64, tiles=2, floor=20.5)),  # 21.75 dB
    "hunyuan-video": Family(
        "memkit-hunyuan-video-vae.safetensors", "comfy.ldm.models.autoencoder.AutoencoderKL", 16, 8, 4, "volume",
        small=(1, 16, 2, 4, 4), out=(1, 5, 32, 32, 3),
        spatial_tiles=Tiled((1, 16, 2, 8, 12), SPATIAL_64, tiles=2, floor=18.0),  # 19.09 dB
        temporal_chunks=Tiled((1, 16, 7, 4, 4), {"tile_t": 16, "stride_t": 12}, tiles=2, floor=14.5)),  # 15.73
    "ltxv": Family(
        "memkit-ltxv-vae.safetensors", "comfy.ldm.lightricks.vae.causal_video_autoencoder.VideoVAE", 128, 32, 8,
        "volume",
        small=(1, 128, 2, 2, 2), out=(1, 9, 64, 64, 3),
        spatial_tiles=Tiled((1, 128, 2, 2, 4), SPATIAL_96, tiles=2, floor=16.0),  # 17.16 dB
        temporal_chunks=Tiled((1, 128, 4, 2, 2), {"tile_t": 16, "stride_t": 8}, tiles=3, floor=11.5)),  # 12.85
    "mochi": Family(
        "memkit-mochi-vae.safetensors", "comfy.ldm.genmo.vae.model.VideoVAE", 12, 8, 6, "volume",
        small=(1, 12, 2, 4, 4), out=(1, 7, 32, 32, 3),
        spatial_tiles=Tiled((1, 12, 2, 4, 8), {"tile_x": 48, "tile_y": 48, "stride_x": 32, "stride_y": 32},
                            tiles=2, floor=23.0),  # 24.44 dB
        temporal_chunks=Tiled((1, 12, 5, 4, 4), {"tile_t": 18, "stride_t": 12}, tiles=2, floor=17.0)),  # 18.42
}
CHUNKED_IN_TIME = [name for name, family in FAMILIES.items() if family.temporal_chunks is not None]


@dataclass
class Loaded:
    family: Family
    vae: object
    untiled: dict  # latent shape -> VAE.decode output, computed once per family


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def loaded(request, comfy_host):
    family = FAMILIES[request.param]
    vae = comfy_host.nodes.VAELoader().load_vae(family.file)[0]
    yield Loaded(family, vae, {})
    del vae
    gc.collect()


def latent_for(shape: tuple[int, ...]) -> torch.Tensor:
    return structured_latent(shape, SEED)


def untiled(loaded: Loaded, shape: tuple[int, ...]) -> torch.Tensor:
    if shape not in loaded.untiled:
        with torch.inference_mode():
            loaded.untiled[shape] = loaded.vae.decode(latent_for(shape))
    return loaded.untiled[shape]


def tiled(loaded: Loaded, case: Tiled):
    from comfyui_memkit.vae_tiling.decode import TiledVAEDecoder
    from comfyui_memkit.vae_tiling.plan import TileSettings

    decoder = TiledVAEDecoder(loaded.vae)
    latent = latent_for(case.shape)
    # time is never tiled in the spatial cases: the default temporal tile is longer than every clip here
    plan = decoder.plan(tuple(latent.shape), TileSettings(**case.settings))
    with torch.inference_mode():
        return plan, decoder.decode(latent, plan)


def test_vaeloader_detects_the_family(loaded):
    family, vae = loaded.family, loaded.vae
    model = vae.first_stage_model
    assert f"{type(model).__module__}.{type(model).__name__}" == family.model
    assert vae.latent_channels == family.latent_channels
    assert vae.spacial_compression_decode() == family.spatial
    assert vae.temporal_compression_decode() == family.temporal


def test_decode_is_finite_not_flat_and_shaped(loaded):
    images = untiled(loaded, loaded.family.small)
    assert tuple(images.shape) == loaded.family.out
    assert torch.isfinite(images).all()
    clamped = ((images == 0) | (images == 1)).float().mean().item()
    log.info("%s: std %.3f, clamped %.3f", loaded.family.file, images.std().item(), clamped)
    assert images.std().item() > 0.1
    assert clamped < 0.3
    if images.ndim == 5:  # every frame has content, not just the first
        assert min(images[0, t].std().item() for t in range(images.shape[1])) > 0.05


def test_tiled_decoder_picks_the_family_method(loaded):
    from comfyui_memkit.vae_tiling.decode import TiledVAEDecoder

    method = TiledVAEDecoder(loaded.vae).method(len(loaded.family.small)).name
    log.info("%s: %s", loaded.family.file, method)
    assert method == loaded.family.method


def test_latent_within_one_tile_decodes_exactly_as_vae_decode(loaded):
    from comfyui_memkit.vae_tiling.decode import TiledVAEDecoder
    from comfyui_memkit.vae_tiling.plan import TileSettings

    decoder = TiledVAEDecoder(loaded.vae)
    latent = latent_for(loaded.family.small)
    plan = decoder.plan(tuple(latent.shape), TileSettings())
    assert plan.grid is None, plan.describe()
    with torch.inference_mode():
        ours = decoder.decode(latent, plan)
    assert torch.equal(ours, untiled(loaded, loaded.family.small))


def test_spatial_tiles_match_untiled(loaded):
    case = loaded.family.spatial_tiles
    plan, ours = tiled(loaded, case)
    reference = untiled(loaded, case.shape)
    assert plan.method.name == loaded.family.method
    assert plan.tiles == case.tiles, plan.describe()
    assert ours.shape == reference.shape
    assert torch.isfinite(ours).all()
    score = psnr(reference, ours)
    log.info("%s: %s: PSNR %.2f dB", loaded.family.file, plan.describe(), score)
    assert score >= case.floor, f"{score:.2f} dB"


@pytest.mark.parametrize("loaded", CHUNKED_IN_TIME, indirect=True)
def test_whole_clip_vaes_are_chunked_in_time_close_to_untiled(loaded):
    """Chunks in time with one latent frame of overlap. The floors are low because a seeded VAE's
    frames depend on the whole short clip: a chunk decoded alone differs from the same frames in
    the full decode even far from its edges (checked: each chunk lines up best at the position the
    plan gives it, so this is context, not misplacement)."""
    case = loaded.family.temporal_chunks
    plan, ours = tiled(loaded, case)
    reference = untiled(loaded, case.shape)
    assert plan.method.name == "volume"
    assert len(plan.grid.sizes) == 3  # (t, y, x): time is tiled
    assert plan.tiles == case.tiles, plan.describe()
    assert len({region[0] for region in plan.regions}) == case.tiles  # every tile is a chunk in time
    assert ours.shape == reference.shape
    assert torch.isfinite(ours).all()
    per_frame = [psnr(reference[0, t], ours[0, t]) for t in range(reference.shape[1])]
    score = psnr(reference, ours)
    log.info("%s: %s: PSNR %.2f dB, worst frame %.2f dB", loaded.family.file, plan.describe(), score,
             min(per_frame))
    assert score >= case.floor, f"{score:.2f} dB"
