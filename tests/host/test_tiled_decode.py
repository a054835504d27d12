"""Tiled VAE decode against the real ComfyUI VAE classes and seeded real-architecture VAEs."""

from __future__ import annotations

import time

import pytest
import torch
from support.latents import structured_latent
from support.metrics import psnr

pytestmark = pytest.mark.slow

SEED = 20261123
NODE_DEFAULTS = {"tile_x": 272, "tile_y": 272, "tile_stride_x": 144, "tile_stride_y": 128, "temporal_size": 64,
                 "temporal_stride": 48}  # the node's documented defaults, spelled out


@pytest.fixture(scope="module")
def sd_vae(comfy_host):
    return comfy_host.nodes.VAELoader().load_vae("memkit-sd-vae.safetensors")[0]


@pytest.fixture(scope="module")
def wan_vae(comfy_host):
    return comfy_host.nodes.VAELoader().load_vae("memkit-wan21-vae.safetensors")[0]


@pytest.fixture(scope="module")
def node(comfy_host):
    from comfyui_memkit.nodes.tiled_decode import MemKitTiledVAEDecode

    def run(vae, latent, auto=False, **settings):
        with torch.inference_mode():
            return MemKitTiledVAEDecode.execute(samples={"samples": latent}, vae=vae, auto=auto,
                                                **(NODE_DEFAULTS | settings)).result[0]

    return run


def vae_decode(comfy_host, vae, latent):
    with torch.inference_mode():
        return comfy_host.nodes.VAEDecode().decode(vae, {"samples": latent})[0]


def test_split_wan_decoder_matches_the_decoder_on_a_whole_latent(wan_vae):
    from comfyui_memkit.vae_tiling.stages import WanStages

    model = wan_vae.first_stage_model
    assert WanStages.supports(model)
    latent = structured_latent((1, 16, 3, 6, 5), SEED)
    stages = WanStages(model)
    with torch.inference_mode():
        assert torch.equal(stages.upsampling_stage(stages.latent_stage(latent)), model.decode(latent))


def test_split_decoder_matches_the_decoder_on_a_whole_latent(sd_vae):
    from comfyui_memkit.vae_tiling.stages import KLStages

    model = sd_vae.first_stage_model
    assert KLStages.supports(model)
    latent = structured_latent((1, 4, 12, 10), SEED)
    stages = KLStages(model)
    with torch.inference_mode():
        assert torch.equal(stages.upsampling_stage(stages.latent_stage(latent)), model.decode(latent))


@pytest.mark.parametrize("shape", [(1, 4, 24, 32), (2, 4, 34, 34)])
def test_latent_within_one_tile_decodes_exactly_as_vae_decode(comfy_host, sd_vae, node, shape):
    latent = structured_latent(shape, SEED)
    assert torch.equal(node(sd_vae, latent), vae_decode(comfy_host, sd_vae, latent))


def test_video_within_one_tile_decodes_exactly_as_vae_decode(comfy_host, wan_vae, node):
    latent = structured_latent((1, 16, 3, 8, 10), SEED)
    expected = vae_decode(comfy_host, wan_vae, latent)
    assert expected.shape == (9, 64, 80, 3)
    assert torch.equal(node(wan_vae, latent), expected)


def test_sd_tiles_match_untiled_and_beat_comfyui_tiled_at_the_same_tile(comfy_host, sd_vae, node):
    """Tolerance: PSNR >= 19 dB against untiled (20.7 dB measured) with these small 128-px tiles, and
    higher than VAEDecodeTiled's. Each tile normalises with its own GroupNorm statistics, which
    on this image-like latent differ from the whole image's; that, not the seams, is the error."""
    latent = structured_latent((1, 4, 24, 40), SEED)
    untiled = vae_decode(comfy_host, sd_vae, latent)
    ours = node(sd_vae, latent, tile_x=128, tile_y=128, tile_stride_x=96, tile_stride_y=96, precision="fast")
    with torch.inference_mode():
        theirs = comfy_host.nodes.VAEDecodeTiled().decode(sd_vae, {"samples": latent}, 128, 32)[0]
    assert ours.shape == untiled.shape == (1, 192, 320, 3)
    assert torch.isfinite(ours).all()
    assert psnr(untiled, ours) >= 19.0
    assert psnr(untiled, ours) > psnr(untiled, theirs)


def test_x_is_width_and_y_is_height(comfy_host, sd_vae):
    from comfyui_memkit.vae_tiling.decode import TiledVAEDecoder
    from comfyui_memkit.vae_tiling.plan import TileSettings

    plan = TiledVAEDecoder(sd_vae).plan((1, 4, 20, 60), TileSettings(256, 128, 192, 64, 64, 48))
    assert plan.grid.sizes == (16, 32)  # (height, width) in latent units
    assert plan.tiles == 2 * 3  # swapped, it would be 1 row of 7


def test_wan_tiles_keep_the_causal_cache_over_all_frames(comfy_host, wan_vae, node):
    """Every frame, including the last ones that lean on the cache, stays close to untiled."""
    latent = structured_latent((1, 16, 3, 16, 24), SEED)
    untiled = vae_decode(comfy_host, wan_vae, latent)
    ours = node(wan_vae, latent, tile_x=96, tile_y=96, tile_stride_x=64, tile_stride_y=64)
    assert ours.shape == untiled.shape == (9, 128, 192, 3)
    assert torch.isfinite(ours).all()
    per_frame = [psnr(untiled[i], ours[i]) for i in range(9)]
    assert min(per_frame) >= 25.0, per_frame


@pytest.mark.parametrize("precision", ["fast", "precise"])
def test_progress_reports_every_tile(sd_vae, precision):
    from comfyui_memkit.vae_tiling.decode import TiledVAEDecoder
    from comfyui_memkit.vae_tiling.plan import TileSettings
    from comfyui_memkit.vae_tiling.stages import KLStages
    from comfyui_memkit.vae_tiling.synced import SyncedKLDecoder

    decoder = TiledVAEDecoder(sd_vae, precision)
    latent = structured_latent((2, 4, 16, 20), SEED)
    plan = decoder.plan(tuple(latent.shape), TileSettings(96, 96, 64, 64))
    seen = []
    with torch.inference_mode():
        decoder.decode(latent, plan, progress=lambda done, total: seen.append((done, total)))
    assert plan.tiles == 2 * 2
    per_tile = SyncedKLDecoder(KLStages(sd_vae.first_stage_model), "cpu", "cpu").ticks() if precision == "precise" \
        else 1
    total = 2 * 4 * per_tile
    assert seen == [(i, total) for i in range(1, total + 1)]
    assert per_tile == (1 if precision == "fast" else 2 * 3 * 3 + 3 + 1)  # SD: 3 levels x 3 blocks, 3 upsamples, out


def test_auto_decodes_untiled_when_memory_allows(comfy_host, sd_vae, node):
    latent = structured_latent((1, 4, 40, 40), SEED)  # larger than one default tile
    assert torch.equal(node(sd_vae, latent, auto=True), vae_decode(comfy_host, sd_vae, latent))


def test_auto_picks_the_largest_tiles_that_fit_when_memory_is_short(sd_vae):
    from comfyui_memkit.vae_tiling.decode import TiledVAEDecoder
    from comfyui_memkit.vae_tiling.stages import KLStages

    decoder = TiledVAEDecoder(sd_vae)
    shape = (1, 4, 80, 80)
    estimate = lambda s: sd_vae.memory_used_decode(s, sd_vae.vae_dtype)  # noqa: E731
    budget = estimate((1, 4, 40, 40))
    plan = decoder.plan(shape, None, free_memory=budget)
    side = plan.grid.sizes[0]
    assert plan.grid.sizes == (side, side)
    assert plan.grid.strides == (side - 8, side - 8)  # 64 px of overlap
    beside = budget - decoder.latent_stage_memory(shape, KLStages)  # its output stays for every tile
    assert estimate((1, 4, side, side)) <= beside < estimate((1, 4, side + 8, side + 8))
    assert decoder.plan(shape, None, free_memory=estimate(shape)).grid is None  # fits: untiled


@pytest.mark.parametrize(("settings", "message"), [
    ({"tile_stride_x": 300}, "tile_x (272) must be greater than tile_stride_x (300)"),
    ({"tile_y": 128, "tile_stride_y": 128}, "tile_y (128) must be greater than tile_stride_y (128)"),
    ({"temporal_stride": 64}, "temporal_size (64) must be greater than temporal_stride (64)"),
])
def test_invalid_settings_are_rejected_before_running(comfy_host, settings, message):
    from comfyui_memkit.nodes.tiled_decode import MemKitTiledVAEDecode

    assert message in MemKitTiledVAEDecode.validate_inputs(**(NODE_DEFAULTS | settings))


def test_settings_that_round_to_no_overlap_name_the_inputs(sd_vae, node):
    from comfyui_memkit.vae_tiling.plan import TileSettingsError

    latent = structured_latent((1, 4, 40, 40), SEED)
    with pytest.raises(TileSettingsError, match=r"tile_x \(100\) and tile_stride_x \(97\) round to the same size"):
        node(sd_vae, latent, tile_x=100, tile_stride_x=97)


def test_precise_tiles_match_untiled_far_better_than_fast_ones(comfy_host, sd_vae, node):
    """Layer-synchronous GroupNorm statistics: 41.7 dB measured here with 128-px tiles and 32 px of
    overlap (fast: 20.5 dB; at 256/64 on 640x640 see BENCHMARKS.md)."""
    latent = structured_latent((1, 4, 24, 40), SEED)
    untiled = vae_decode(comfy_host, sd_vae, latent)
    tiles = {"tile_x": 128, "tile_y": 128, "tile_stride_x": 96, "tile_stride_y": 96}
    precise = node(sd_vae, latent, precision="precise", **tiles)
    fast = node(sd_vae, latent, precision="fast", **tiles)
    assert precise.shape == untiled.shape
    assert psnr(untiled, precise) >= 40.0
    assert psnr(untiled, precise) > psnr(untiled, fast) + 15


def test_precise_parks_every_tile_between_layers_and_says_what_it_parked(sd_vae):
    from comfyui_memkit.vae_tiling.decode import TiledVAEDecoder
    from comfyui_memkit.vae_tiling.plan import TileSettings

    decoder = TiledVAEDecoder(sd_vae, "precise")
    latent = structured_latent((1, 4, 24, 40), SEED)
    plan = decoder.plan(tuple(latent.shape), TileSettings(128, 128, 96, 96))
    assert plan.precise
    assert "precise" in plan.describe()
    with torch.inference_mode():
        decoder.decode(latent, plan)
    # at the last level every tile holds two 128-channel fp32 tensors of its 128x128 pixels
    assert decoder.ledger.peak >= plan.tiles * 2 * 128 * 128 * 128 * 4
    assert decoder.ledger.parked == 0, "every parked tensor was taken back"


def test_the_device_working_set_of_precise_tiles_is_bounded_by_the_tile(sd_vae):
    """What is alive on the decode device (all tensors the decode makes, less the parked tiles)
    stays near one tile's working set: here below a third of the untiled decode's."""
    from support.live_tensors import LiveTensors

    from comfyui_memkit.vae_tiling.decode import TiledVAEDecoder
    from comfyui_memkit.vae_tiling.plan import TileSettings

    latent = structured_latent((1, 4, 48, 48), SEED)
    with torch.inference_mode():
        TiledVAEDecoder(sd_vae).prepare(tuple(latent.shape))
        with LiveTensors() as untiled:
            sd_vae.first_stage_model.decode(latent)
        decoder = TiledVAEDecoder(sd_vae, "precise")
        decoder.prepare(tuple(latent.shape))  # ComfyUI loads (patches) the weights: not the decode's memory
        plan = decoder.plan(tuple(latent.shape), TileSettings(128, 128, 96, 96))
        with LiveTensors(excluded=lambda: decoder.ledger.parked) as tiled:
            decoder.decode(latent, plan)
    assert plan.tiles == 16
    assert tiled.peak < untiled.peak / 3, (tiled.peak, untiled.peak)


def test_interrupt_stops_between_tiles(comfy_host, sd_vae, node):
    import comfy.model_management as mm

    latent = structured_latent((1, 4, 24, 40), SEED)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node(sd_vae, latent, tile_x=128, tile_y=128, tile_stride_x=96, tile_stride_y=96)
    finally:
        mm.interrupt_current_processing(False)


def test_out_of_memory_retries_with_smaller_tiles_then_whole_model_tiles(sd_vae, caplog):
    from comfyui_memkit.vae_tiling.decode import TiledVAEDecoder
    from comfyui_memkit.vae_tiling.plan import TileSettings

    class SimulatedOutOfMemoryError(RuntimeError):
        pass

    def simulated(error: BaseException) -> bool:
        return isinstance(error, SimulatedOutOfMemoryError)

    class TightDevice(TiledVAEDecoder):
        """Raises like a GPU out of memory for tiles larger than ``limit`` latent positions per side."""

        limit = 20
        split_ok = True

        def _decoded_tiles(self, latent, plan, check, tick):
            if max(b - a for a, b in plan.regions[0]) > self.limit or (plan.method.name != "whole-model"
                                                                        and not self.split_ok):
                raise SimulatedOutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            yield from super()._decoded_tiles(latent, plan, check, tick)

    latent = structured_latent((1, 4, 24, 40), SEED)
    decoder = TightDevice(sd_vae, "fast")
    plan = decoder.plan(tuple(latent.shape), TileSettings(256, 256, 192, 192))
    with torch.inference_mode(), caplog.at_level("WARNING"):
        out = decoder.decode_with_retries(latent, plan, out_of_memory=simulated)
        expected = TiledVAEDecoder(sd_vae, "fast").decode(latent, decoder._smaller(tuple(latent.shape), plan))
    assert torch.equal(out, expected), "the retry decoded the half-size plan"
    assert "ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in caplog.text
    decoder.split_ok, decoder.limit = False, 64  # the split fails at every size: whole-model tiles
    with torch.inference_mode():
        out = decoder.decode_with_retries(latent, plan, out_of_memory=simulated)
    assert out.shape == (1, 192, 320, 3)
    assert "whole-model" in caplog.text
    decoder.limit = 0  # nothing fits: the error reaches ComfyUI
    with pytest.raises(SimulatedOutOfMemoryError), torch.inference_mode():
        decoder.decode_with_retries(latent, plan, out_of_memory=simulated)


def test_out_of_memory_in_comfyuis_own_fallback_tiles_retries_with_ours(sd_vae, monkeypatch, caplog):
    """An untiled plan is VAE.decode's: on out-of-memory ComfyUI decodes again with its own tiles, and
    only when those run out of memory too (outside its try) does the error reach MemKit's retry,
    which then decodes tiles of half the latent's longer side."""
    import comfy.model_management as mm

    from comfyui_memkit.vae_tiling.decode import TiledVAEDecoder, tiled_decode
    from comfyui_memkit.vae_tiling.plan import TileSettings

    if mm.OOM_EXCEPTION is Exception:
        pytest.skip("this torch has no out-of-memory error type, so nothing is retried")
    model_class = type(sd_vae.first_stage_model)
    real_decode = model_class.decode

    def decode(self, z, **kwargs):  # as a GPU that runs out of memory above 20 latent positions a side
        if max(z.shape[-2:]) > 20:
            raise mm.OOM_EXCEPTION("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_decode(self, z, **kwargs)

    latent = structured_latent((1, 4, 24, 40), SEED)
    settings = TileSettings(512, 512, 384, 384)  # the latent is within one tile: untiled
    decoder = TiledVAEDecoder(sd_vae, "fast")
    untiled = decoder.plan(tuple(latent.shape), settings)
    assert untiled.grid is None
    monkeypatch.setattr(model_class, "decode", decode)
    with torch.inference_mode(), caplog.at_level("WARNING"):
        out = tiled_decode(sd_vae, latent, settings, "fast")
        expected = decoder.decode(latent, decoder._smaller(tuple(latent.shape), untiled))
    assert "Ran out of memory when regular VAE decoding" in caplog.text, "ComfyUI's own tiles ran first"
    assert ("MemKit tiled decode ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB) with untiled"
            in caplog.text)
    assert torch.equal(out, expected), "the retry decoded MemKit tiles of half the longer side"


def test_a_latent_stage_that_does_not_fit_runs_per_tile(sd_vae, caplog):
    from comfyui_memkit.vae_tiling.decode import TiledVAEDecoder
    from comfyui_memkit.vae_tiling.plan import TileSettings
    from comfyui_memkit.vae_tiling.stages import KLStages

    decoder = TiledVAEDecoder(sd_vae)
    shape = (1, 4, 80, 80)
    need = decoder.latent_stage_memory(shape, KLStages)
    assert need == 80 * 80 * 512 * 4 * 11 + 32 * 2**20  # activations, and the attention scores held at once
    with caplog.at_level("INFO"):
        plan = decoder.plan(shape, TileSettings(256, 256, 192, 192), free_memory=need - 1)
    assert plan.method.name == "whole-model"
    assert not plan.precise
    assert "latent stage" in caplog.text
    assert decoder.plan(shape, TileSettings(256, 256, 192, 192), free_memory=need * 2).method.name == "kl-staged"


def test_a_split_that_no_longer_matches_comfyui_falls_back_to_whole_model_tiles(comfy_host, caplog):
    """As if another ComfyUI version changed the decoder: our split would decode it wrongly, so the
    first-use check against ComfyUI's own decode turns it off, with one log line."""
    from comfyui_memkit.vae_tiling import decode as decode_module
    from comfyui_memkit.vae_tiling.plan import TileSettings

    vae = comfy_host.nodes.VAELoader().load_vae("memkit-sd-vae.safetensors")[0]  # a copy of our own
    original = type(vae.first_stage_model.decoder)

    class Decoder(original):  # same name, so the split still claims it
        def forward(self, z, **kwargs):
            return super().forward(z, **kwargs) * 0.5

    class ChangedAutoencoder(type(vae.first_stage_model)):
        pass

    vae.first_stage_model.decoder.__class__ = Decoder
    vae.first_stage_model.__class__ = ChangedAutoencoder  # its own entry in the per-class check
    latent = structured_latent((1, 4, 24, 40), SEED)
    decoder = decode_module.TiledVAEDecoder(vae, "fast")
    plan = decoder.plan(tuple(latent.shape), TileSettings(128, 128, 96, 96))
    assert plan.method.name == "kl-staged"
    with caplog.at_level("WARNING"), torch.inference_mode():
        out = decoder.decode(latent, plan)
        untiled = vae.decode(latent)
    assert "differs from ComfyUI's decode" in caplog.text
    assert psnr(untiled, out) > 15, "whole-model tiles of the changed decoder, not our split of the old one"


def test_the_first_use_check_also_covers_the_chunked_split_attention(comfy_host, monkeypatch):
    """The chunked attention mirrors ComfyUI's AttnBlock; if it stopped matching (another ComfyUI
    changed the block), the first-use check turns the split off, although its tiny latent alone
    would never be chunked."""
    from comfyui_memkit.vae_tiling import decode as decode_module
    from comfyui_memkit.vae_tiling import stages as stages_module

    vae = comfy_host.nodes.VAELoader().load_vae("memkit-sd-vae.safetensors")[0]

    class OtherAutoencoder(type(vae.first_stage_model)):  # its own entry in the per-class check
        pass

    vae.first_stage_model.__class__ = OtherAutoencoder
    decoder = decode_module.TiledVAEDecoder(vae, "fast")
    real = stages_module.chunked_attention_block
    monkeypatch.setattr(decode_module, "_split_checked", {})
    monkeypatch.setattr(stages_module, "chunked_attention_block", lambda block, x, n: real(block, x, n) * 1.01)
    assert decoder.split_matches_comfyui(stages_module.KLStages, precise=False) is False
    monkeypatch.setattr(decode_module, "_split_checked", {})
    monkeypatch.setattr(stages_module, "chunked_attention_block", real)
    assert decoder.split_matches_comfyui(stages_module.KLStages, precise=False) is True


def convolutions_are_fast_in(dtype: torch.dtype) -> bool:
    """Whether this CPU has kernels for ``dtype``'s convolutions: without them (fp16 on most CPUs,
    bf16 on CPUs without AVX512-BF16 or AMX) PyTorch runs them about 70x slower than float32, and a
    VAE decode takes many minutes. ComfyUI itself decodes in float32 on a CPU."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(1, 64, 48, 48)

    def seconds(d: torch.dtype) -> float:
        c, y = conv.to(d), x.to(d)
        c(y)  # warm-up
        times = []
        for _ in range(3):  # the fastest of three: one sample on a busy machine can be far off
            start = time.perf_counter()
            c(y)
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.inference_mode():
        return seconds(dtype) < 5 * seconds(torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_vaes_tile_like_comfyui_runs_them(comfy_host, dtype):
    if not convolutions_are_fast_in(dtype):
        pytest.skip(f"this CPU has no fast {dtype} convolutions (a decode would take minutes; see the helper)")
    import comfy.sd
    import comfy.utils

    from comfyui_memkit.vae_tiling.decode import TiledVAEDecoder
    from comfyui_memkit.vae_tiling.plan import TileSettings

    path = comfy_host.folder_paths.get_full_path("vae", "memkit-sd-vae.safetensors")
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(path), dtype=dtype)
    assert vae.vae_dtype == dtype
    # small: a CPU without half-precision kernels (fp16 here, bf16 on CPUs without AVX512-BF16) runs
    # these convolutions about 70x slower than float32, so a 192x320 decode took minutes per pass
    latent = structured_latent((1, 4, 8, 16), SEED)
    with torch.inference_mode():
        untiled = vae.decode(latent)
        results = {}
        for precision in ("fast", "precise"):
            decoder = TiledVAEDecoder(vae, precision)
            plan = decoder.plan(tuple(latent.shape), TileSettings(96, 64, 64, 32))
            assert plan.tiles > 1, plan
            results[precision] = decoder.decode(latent, plan)
    for out in results.values():
        assert out.shape == untiled.shape
        assert torch.isfinite(out).all()
    assert psnr(untiled, results["precise"]) >= 35.0
    assert psnr(untiled, results["precise"]) > psnr(untiled, results["fast"])


def test_wan_has_no_groupnorm_so_precise_is_the_fast_path(wan_vae):
    from comfyui_memkit.vae_tiling.decode import TiledVAEDecoder
    from comfyui_memkit.vae_tiling.plan import TileSettings

    plan = TiledVAEDecoder(wan_vae, "precise").plan((1, 16, 3, 16, 24), TileSettings(96, 96, 64, 64))
    assert plan.method.name == "wan-staged"
    assert not plan.precise


def test_the_latent_stage_runs_split_attention_in_bounded_chunks_of_queries(sd_vae):
    """Where ComfyUI's VAE attention is its split attention (as on this CPU), the latent stage holds
    at most ``attention_score_bytes`` of scores at once instead of the whole score matrix, with
    ComfyUI's attention's result."""
    from support.live_tensors import LiveTensors

    from comfyui_memkit.vae_tiling.stages import KLStages, split_attention

    model = sd_vae.first_stage_model
    assert split_attention(model.decoder.mid.attn_1), "ComfyUI runs split attention in the VAE on a CPU"
    latent = structured_latent((1, 4, 40, 40), SEED)  # 1600 positions: 20 MB of fp32 scores and softmax
    whole, chunked = KLStages(model, attention_score_bytes=2**40), KLStages(model, attention_score_bytes=2**21)
    with torch.inference_mode():
        with LiveTensors() as at_once:
            expected = whole.latent_stage(latent)
        with LiveTensors() as in_chunks:
            got = chunked.latent_stage(latent)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()
    scores = 2 * 1600 * 1600 * 4
    assert at_once.peak - in_chunks.peak > 0.8 * scores, (at_once.peak, in_chunks.peak)


# --- ComfyUI 0.38, read not run: what its VAE code changed, simulated on 0.3.75's real modules ----------

def test_a_kl_decoder_without_give_pre_end_still_plans_precise_tiles(sd_vae, monkeypatch):
    """ComfyUI 0.38's Decoder has no ``give_pre_end``: planning (which asks whether the precise
    decoder fits this VAE) must not fail the node there, and the precise decoder stays chosen. The
    decode itself is then run with the attribute back: 0.3.75's own forward reads it."""
    from comfyui_memkit.vae_tiling.decode import TiledVAEDecoder
    from comfyui_memkit.vae_tiling.plan import TileSettings

    latent = structured_latent((1, 4, 24, 40), SEED)
    decoder = TiledVAEDecoder(sd_vae, "precise")
    monkeypatch.delattr(sd_vae.first_stage_model.decoder, "give_pre_end")
    plan = decoder.plan(tuple(latent.shape), TileSettings(256, 256, 192, 192))
    monkeypatch.undo()
    assert plan.grid is not None
    assert plan.precise, plan.describe()
    with torch.inference_mode():
        assert torch.isfinite(decoder.decode(latent, plan)).all()


def test_the_wan_cache_is_sized_by_whichever_counter_this_comfyui_has(wan_vae, monkeypatch):
    from comfy.ldm.wan import vae as wan

    from comfyui_memkit.vae_tiling.comfy_models import wan_cache_layers

    decoder = wan_vae.first_stage_model.decoder
    assert wan_cache_layers(decoder) == wan.count_conv3d(decoder) > 0
    monkeypatch.setattr(wan, "count_cache_layers", lambda d: 99, raising=False)  # ComfyUI 0.38's name
    assert wan_cache_layers(decoder) == 99


def test_out_of_memory_and_free_memory_are_comfyuis_own_where_it_has_them(sd_vae, monkeypatch):
    import comfy.model_management as mm

    from comfyui_memkit.vae_tiling import comfy_models

    assert not comfy_models.is_out_of_memory(ValueError("a real error"))
    if mm.OOM_EXCEPTION is not Exception:
        assert comfy_models.is_out_of_memory(mm.OOM_EXCEPTION("CUDA out of memory"))
    monkeypatch.setattr(mm, "is_oom", lambda error: "out of memory" in str(error), raising=False)  # 0.38
    assert comfy_models.is_out_of_memory(RuntimeError("CUDA error: out of memory"))  # an AcceleratorError's
    assert comfy_models.free_memory(sd_vae) > 0  # the module's, on 0.3.75 (it moves: no equality)
    monkeypatch.setattr(sd_vae.patcher, "get_free_memory", lambda device: 123, raising=False)  # dynamic VRAM
    assert comfy_models.free_memory(sd_vae) == 123
