"""Blending decoded tiles: feathered weights, fp32 sums, normalised by the summed weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def feather(length: int, fade_in: int, fade_out: int) -> torch.Tensor:
    """1-D weights for one tile: linear ramps over the parts shared with the previous/next tile.

    A ramp of n samples is ``(i + 0.5) / n``, so the rising ramp of one tile and the falling ramp
    of its neighbour over the same samples add up to exactly 1. Edges of the image get weight 1.
    """
    weights = torch.ones(length, dtype=torch.float32)
    fade_in, fade_out = min(fade_in, length), min(fade_out, length)
    if fade_in > 0:
        weights[:fade_in] = (torch.arange(fade_in, dtype=torch.float32) + 0.5) / fade_in
    if fade_out > 0:
        weights[length - fade_out:] *= (torch.arange(fade_out, 0, -1, dtype=torch.float32) - 0.5) / fade_out
    return weights


def axis_feathers(out_spans: Sequence[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
    """Weights for every span on one axis, fading only where the span overlaps a neighbour."""
    ordered = sorted(set(out_spans))
    result = {}
    for i, (start, end) in enumerate(ordered):
        fade_in = max(0, ordered[i - 1][1] - start) if i > 0 else 0
        fade_out = max(0, end - ordered[i + 1][0]) if i + 1 < len(ordered) else 0
        result[(start, end)] = feather(end - start, fade_in, fade_out)
    return result


class BlendAccumulator:
    """Running weighted sum of tiles over an output of ``shape`` whose last ``tiled_axes`` axes are tiled.

    Sums are fp32 on ``device`` (ComfyUI's intermediate device); the weight sum is kept once per
    position of the tiled axes, not per channel or frame, since the weights are separable.
    """

    def __init__(self, shape: Sequence[int], tiled_axes: int, device: torch.device | str = "cpu") -> None:
        self.total = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
        self.weight = torch.zeros(tuple(shape[len(shape) - tiled_axes:]), dtype=torch.float32, device=device)

    def add(self, tile: torch.Tensor, region: Sequence[tuple[int, int]], weights: Sequence[torch.Tensor]) -> None:
        """Add one decoded tile (already fp32 on the accumulator's device) at ``region``.

        The tile is scaled in place: it is consumed, so the caller can drop it right after.
        """
        window = tuple(slice(a, b) for a, b in region)
        mask = _outer(weights).to(self.weight.device)
        tile.mul_(mask)
        self.total[(..., *window)].add_(tile)
        self.weight[window].add_(mask)

    def finish(self) -> torch.Tensor:
        """The blended output; the accumulator must not be used afterwards."""
        if not bool((self.weight > 0).all()):
            raise RuntimeError("tiled decode left part of the output uncovered; this is a bug in the tile plan")
        result = self.total.div_(self.weight)
        self.total = self.weight = None
        return result


def _outer(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    mask = weights[0]
    for w in weights[1:]:
        mask = mask.unsqueeze(-1) * w
    return mask
