"""How close one decoded image is to another (pixel values 0..1)."""

from __future__ import annotations

import math

import torch


def psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for a peak of 1.0; inf when the two are identical."""
    mse = torch.mean((reference.float() - other.float()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
