"""The tile planner, the blender and the decode methods' facts, without ComfyUI."""

from __future__ import annotations

import itertools

import pytest
import torch

from comfyui_memkit.vae_tiling.blend import BlendAccumulator, axis_feathers, feather
from comfyui_memkit.vae_tiling.plan import (
    TileSettings,
    TileSettingsError,
    fits_one_tile,
    latent_grid,
    plan_tiles,
    recompute_factor,
    spans,
)


def test_spans_are_the_fewest_equal_tiles_that_cover_with_the_overlap_asked_for():
    for length, tile, stride in itertools.product(range(1, 70), range(2, 24), range(1, 24)):
        if stride >= tile:
            continue
        result = spans(length, tile, stride)
        covered = torch.zeros(length, dtype=torch.int32)
        for start, end in result:
            covered[start:end] += 1
        assert bool((covered > 0).all())
        assert (result[0][0], result[-1][1]) == (0, length)
        sizes = {end - start for start, end in result}
        assert len(sizes) == 1, (length, tile, stride, result)
        assert max(sizes) <= tile, (length, tile, stride, result)
        if len(result) == 1:
            continue
        overlap, size = tile - stride, sizes.pop()
        assert all(a[1] - b[0] >= overlap for a, b in itertools.pairwise(result)), (length, tile, stride, result)
        assert len(result) == len(range(0, length - tile, stride)) + 1, "as many tiles as the stride gives"
        assert len(result) * (size - 1) - (len(result) - 1) * overlap < length, "no smaller size would cover"


def test_spans_shrink_the_tiles_instead_of_doubling_an_overlap():
    assert spans(48, 32, 24) == [(0, 28), (20, 48)]  # 384 px in 256-px tiles, stride 192: 224-px tiles
    assert spans(80, 32, 24) == [(0, 32), (24, 56), (48, 80)]  # an exact fit is unchanged


def test_a_length_within_one_tile_is_one_span():
    assert spans(20, 32, 24) == [(0, 20)]


def test_latent_grid_rounds_to_the_compression_factor_in_t_y_x_order():
    grid = latent_grid(TileSettings(256, 128, 192, 64, 64, 48), spatial_factor=8, temporal_factor=4)
    assert grid.sizes == (16, 16, 32)
    assert grid.strides == (12, 8, 24)


@pytest.mark.parametrize(("settings", "message"), [
    (TileSettings(tile_x=128, stride_x=0), r"tile_stride_x must be greater than 0 \(got 0\)"),
    (TileSettings(tile_y=128, stride_y=200), r"tile_y \(128\) must be greater than tile_stride_y \(200\)"),
    (TileSettings(tile_x=100, stride_x=97), r"tile_x \(100\) and tile_stride_x \(97\) round to the same size"),
    (TileSettings(tile_x=4, stride_x=2), r"tile_x \(4\) is smaller than the VAE's compression factor \(8\)"),
])
def test_bad_settings_name_the_input(settings, message):
    with pytest.raises(TileSettingsError, match=message):
        latent_grid(settings, spatial_factor=8)


def test_plan_recompute_and_fit():
    grid = latent_grid(TileSettings(256, 256, 192, 192), spatial_factor=8)
    assert len(plan_tiles((1, 4, 80, 80), grid)) == 9
    assert recompute_factor((1, 4, 80, 80), grid) == pytest.approx((96 / 80) ** 2)
    assert fits_one_tile((1, 4, 32, 30), grid)
    assert not fits_one_tile((1, 4, 33, 30), grid)


def test_feathers_of_neighbours_sum_to_one_over_their_overlap():
    weights = axis_feathers([(0, 64), (48, 112), (96, 160)])
    total = torch.zeros(160)
    for (start, end), w in weights.items():
        total[start:end] += w
    assert torch.allclose(total, torch.ones(160))
    assert weights[(0, 64)][0] == 1.0  # image edges are not faded
    assert feather(10, 0, 0).eq(1).all()


def test_blending_crops_of_one_signal_gives_the_signal_back():
    signal = torch.rand(1, 3, 2, 50, 70, generator=torch.Generator().manual_seed(3))
    tiles = plan_tiles(tuple(signal.shape), latent_grid(TileSettings(24, 24, 16, 16), spatial_factor=1))
    weights = [axis_feathers([t[i] for t in tiles]) for i in range(2)]
    accumulator = BlendAccumulator(signal.shape, tiled_axes=2)
    for region in tiles:
        crop = signal[(..., *(slice(a, b) for a, b in region))].clone()
        accumulator.add(crop, region, [w[s] for w, s in zip(weights, region)])
    assert torch.allclose(accumulator.finish(), signal, atol=1e-6)


def test_an_uncovered_output_is_an_error_not_a_silent_zero():
    accumulator = BlendAccumulator((1, 1, 4, 4), tiled_axes=2)
    accumulator.add(torch.ones(1, 1, 2, 4), [(0, 2), (0, 4)], [torch.ones(2), torch.ones(4)])
    with pytest.raises(RuntimeError, match="uncovered"):
        accumulator.finish()


@pytest.mark.parametrize(("length", "tile", "stride"), [(10, 6, 4), (13, 6, 4), (40, 16, 12), (7, 7, 5), (100, 32, 24)])
def test_owned_spans_partition_the_axis_inside_each_tile(length, tile, stride):
    from comfyui_memkit.vae_tiling.plan import owned_spans, spans

    tiles = spans(length, tile, stride)
    owned = owned_spans(tiles, length)
    assert owned[0][0] == 0
    assert owned[-1][1] == length
    assert all(a[1] == b[0] for a, b in itertools.pairwise(owned)), "no gap, no double count"
    assert all(t0 <= o0 <= o1 <= t1 for (t0, t1), (o0, o1) in zip(tiles, owned))
    assert all(o1 > o0 for o0, o1 in owned)


def test_owned_regions_cover_every_position_once():
    from comfyui_memkit.vae_tiling.plan import LatentGrid, owned_regions, plan_tiles

    shape, grid = (1, 4, 30, 45), LatentGrid((16, 16), (12, 12))
    regions = plan_tiles(shape, grid)
    counts = torch.zeros(30, 45)
    for (y0, y1), (x0, x1) in owned_regions(shape, grid, regions):
        counts[y0:y1, x0:x1] += 1
    assert torch.equal(counts, torch.ones(30, 45))


def test_group_statistics_of_parts_are_those_of_the_whole():
    """Chan's combination of per-part means and squared deviations, not an average of variances."""
    from comfyui_memkit.vae_tiling.synced import GroupStatistics

    generator = torch.Generator().manual_seed(4)
    # channel means unequal within a group
    channel_offsets = torch.tensor([0.0, 4.0, -3.0, 1.0, 2.0, 2.5, -1.0, 6.0]).view(1, 8, 1, 1)
    whole = torch.randn((2, 8, 10, 13), generator=generator) * torch.linspace(0.5, 3, 13) + 2.0 + channel_offsets
    stats = GroupStatistics(groups=4)
    for x0, x1 in ((0, 3), (3, 9), (9, 13)):  # unequal parts with unequal statistics
        stats.add(whole[..., x0:x1])
    mean, rstd = stats.finish(eps=1e-6)
    variance, expected_mean = torch.var_mean(whole.reshape(2, 4, -1).double(), dim=-1, correction=0)
    assert torch.allclose(mean, expected_mean, atol=1e-6)
    assert torch.allclose(rstd, torch.rsqrt(variance + 1e-6), rtol=1e-5)
    averaged = torch.stack([whole[..., a:b].reshape(2, 4, -1).var(-1, correction=0)
                            for a, b in ((0, 3), (3, 9), (9, 13))]).mean(0).double()
    assert not torch.allclose(averaged, variance, rtol=1e-2), "the naive average would differ here"


def test_group_norm_with_whole_statistics_is_torchs_group_norm():
    from comfyui_memkit.vae_tiling.synced import GroupStatistics, group_norm_with

    norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 8))
        norm.bias.copy_(torch.linspace(-1, 1, 8))
    x = torch.randn((1, 8, 6, 7), generator=torch.Generator().manual_seed(2)) * 3 + 1
    stats = GroupStatistics(4)
    stats.add(x)
    with torch.no_grad():
        assert torch.allclose(group_norm_with(x, norm, stats.finish(norm.eps)), norm(x), atol=1e-5)
        half = group_norm_with(x.to(torch.bfloat16), norm, stats.finish(norm.eps))
    assert half.dtype == torch.bfloat16


def test_methods_keep_the_names_plans_and_logs_print_and_pair_each_split_with_its_whole_model():
    from comfyui_memkit.vae_tiling.stages import METHODS, FrameCausal, KLStages, Volume, WanStages, WholeModel

    assert [method.name for method in METHODS] == ["kl-staged", "whole-model", "wan-staged", "frame-causal", "volume"]
    assert (KLStages.unsplit, WanStages.unsplit) == (WholeModel, FrameCausal)
    assert all(method.unsplit is None for method in (WholeModel, FrameCausal, Volume))
    assert [method for method in METHODS if method.frame_by_frame] == [WanStages, FrameCausal]
    assert [method for method in METHODS if method.tiles_time] == [Volume]


def test_a_vae_no_split_supports_decodes_with_the_whole_model():
    from comfyui_memkit.vae_tiling.stages import Volume, WholeModel, method_for

    model = torch.nn.Identity()
    model.decode = lambda z: z * 2
    assert method_for(model, 4) is WholeModel
    assert method_for(model, 5) is Volume
    with pytest.raises(ValueError, match="got 3-D"):
        method_for(model, 3)
    latent = torch.arange(12.0).view(1, 1, 3, 4)
    window = (..., slice(1, 3), slice(0, 2))
    assert torch.equal(WholeModel(model).tile_decoder(latent)(window), latent[window] * 2)
    assert WholeModel(model).latent_stage_memory((1, 4, 64, 64), 4) == 0.0
