"""Where the tiles go: settings in pixels/frames, validated, turned into latent spans."""

from __future__ import annotations

import itertools
from dataclasses import dataclass


class TileSettingsError(ValueError):
    """A tile setting that cannot be used; the message names the input and the reason."""


@dataclass(frozen=True)
class TileSettings:
    """Tile sizes and strides as the user gives them: pixels for x (width) and y (height), frames for t.

    ``tile_t``/``stride_t`` only matter for video VAEs that decode a whole volume at once.
    """

    tile_x: int = 272
    tile_y: int = 272
    stride_x: int = 144
    stride_y: int = 128
    tile_t: int = 64
    stride_t: int = 48


@dataclass(frozen=True)
class LatentGrid:
    """Tile size and stride per tiled latent axis, in latent units, in the order (t?, y, x)."""

    sizes: tuple[int, ...]
    strides: tuple[int, ...]


def _check_pair(tile: int, stride: int, tile_name: str, stride_name: str) -> None:
    if stride <= 0:
        raise TileSettingsError(f"{stride_name} must be greater than 0 (got {stride})")
    if tile <= stride:
        raise TileSettingsError(f"{tile_name} ({tile}) must be greater than {stride_name} ({stride}); "
                                f"the difference is the overlap that hides the seams")


def validate_pixel_settings(settings: TileSettings) -> None:
    """The checks that need no VAE: every tile larger than its stride, every stride positive."""
    _check_pair(settings.tile_x, settings.stride_x, "tile_x", "tile_stride_x")
    _check_pair(settings.tile_y, settings.stride_y, "tile_y", "tile_stride_y")
    _check_pair(settings.tile_t, settings.stride_t, "temporal_size", "temporal_stride")


def to_latent(value: int, factor: int, name: str) -> int:
    """Pixels (or frames) to latent units, rounded to the nearest multiple of the VAE's compression."""
    latent = round(value / factor)
    if latent < 1:
        raise TileSettingsError(f"{name} ({value}) is smaller than the VAE's compression factor ({factor})")
    return latent


def latent_grid(settings: TileSettings, spatial_factor: int, temporal_factor: int | None = None) -> LatentGrid:
    """Validate the settings and convert them to latent units.

    Checked twice: as given (so the message quotes the user's numbers) and after rounding to the
    compression factor (rounding may make stride equal to tile).
    """
    validate_pixel_settings(settings)
    pairs = [(settings.tile_y, settings.stride_y, "tile_y", "tile_stride_y", spatial_factor),
             (settings.tile_x, settings.stride_x, "tile_x", "tile_stride_x", spatial_factor)]
    if temporal_factor is not None:
        pairs.insert(0, (settings.tile_t, settings.stride_t, "temporal_size", "temporal_stride", temporal_factor))
    sizes, strides = [], []
    for tile, stride, tile_name, stride_name, factor in pairs:
        tile_l, stride_l = to_latent(tile, factor, tile_name), to_latent(stride, factor, stride_name)
        if tile_l <= stride_l:
            raise TileSettingsError(
                f"{tile_name} ({tile}) and {stride_name} ({stride}) round to the same size at the VAE's "
                f"compression factor {factor} ({tile_l * factor}); make the overlap at least {factor}")
        sizes.append(tile_l)
        strides.append(stride_l)
    return LatentGrid(tuple(sizes), tuple(strides))


def spans(length: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """Half-open [start, end) spans covering ``length``: as many as ``stride`` asks for (the first at
    0, the last ending at ``length``), each of the same size, at most ``tile``, evenly spaced, with
    overlaps of at least ``tile - stride``.

    The size is the smallest that covers ``length`` with that many spans and that overlap, so no
    span overlaps its neighbour by more than it must: 384 px in 256-px tiles, stride 192, are two
    224-px tiles overlapping by 64 px, not two 256-px tiles overlapping by 128 (less decoded twice,
    less memory; the seams depend on the overlap, which is kept).
    """
    if length <= tile:
        return [(0, length)]
    overlap = tile - stride
    count = -(-(length - overlap) // stride)  # the fewest spans ``stride`` apart that reach the end
    size = -(-(length + (count - 1) * overlap) // count)  # <= tile, since count * stride >= length - overlap
    return [(start, start + size) for start in (round(i * (length - size) / (count - 1)) for i in range(count))]


Region = tuple[tuple[int, int], ...]


def plan_tiles(shape: tuple[int, ...], grid: LatentGrid) -> list[Region]:
    """Every tile over the trailing ``len(grid.sizes)`` axes of ``shape``, row-major."""
    axes = shape[len(shape) - len(grid.sizes):]
    per_axis = [spans(n, t, s) for n, t, s in zip(axes, grid.sizes, grid.strides)]
    return list(itertools.product(*per_axis))


def fits_one_tile(shape: tuple[int, ...], grid: LatentGrid) -> bool:
    """True when the latent is no larger than one tile on every tiled axis."""
    axes = shape[len(shape) - len(grid.sizes):]
    return all(n <= t for n, t in zip(axes, grid.sizes))


def recompute_factor(shape: tuple[int, ...], grid: LatentGrid) -> float:
    """How many times each latent position is decoded on average (1.0 means no overlap)."""
    axes = shape[len(shape) - len(grid.sizes):]
    factor = 1.0
    for n, t, s in zip(axes, grid.sizes, grid.strides):
        factor *= sum(b - a for a, b in spans(n, t, s)) / n
    return factor


def owned_spans(tile_spans: list[tuple[int, int]], length: int) -> list[tuple[int, int]]:
    """Which part of each span its tile owns: the spans cut at the middle of every overlap, so the
    owned parts partition [0, length) (every position counted once, e.g. for statistics)."""
    ordered = sorted(tile_spans)
    cuts = [0]
    for (start, _), (_, previous_end) in zip(ordered[1:], ordered[:-1]):
        cuts.append(max(cuts[-1], (start + previous_end) // 2))
    cuts.append(length)
    owned = {span: (cuts[i], cuts[i + 1]) for i, span in enumerate(ordered)}
    return [owned[span] for span in tile_spans]


def owned_regions(shape: tuple[int, ...], grid: LatentGrid, regions: list[Region]) -> list[Region]:
    """``owned_spans`` per axis for every tile of ``plan_tiles``: a partition of the tiled axes."""
    axes = shape[len(shape) - len(grid.sizes):]
    per_axis = []
    for axis, length in enumerate(axes):
        unique = sorted({region[axis] for region in regions})
        per_axis.append(dict(zip(unique, owned_spans(unique, length))))
    return [tuple(per_axis[axis][span] for axis, span in enumerate(region)) for region in regions]
