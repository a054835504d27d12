"""Seeded latents with image-like structure (smooth regions plus detail), for decode tests and benches.

Pure noise is a poor test of tiling: every tile then has the same statistics, so seams and
per-tile drift hide. These latents vary slowly across the frame (and across time for video).
"""

from __future__ import annotations

import torch


def structured_latent(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A latent of ``shape`` (B, C, H, W) or (B, C, T, H, W): coarse random fields, upsampled, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    spatial = shape[2:]
    coarse_size = tuple(max(2, n // 6) for n in spatial)
    coarse = torch.randn((shape[0], shape[1], *coarse_size), generator=generator)
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    smooth = torch.nn.functional.interpolate(coarse, size=spatial, mode=mode, align_corners=True)
    detail = torch.randn(shape, generator=generator)
    return 1.5 * smooth + 0.4 * detail


def write_latent_input(input_dir, name: str, shape: tuple[int, ...], seed: int) -> str:
    """Save a structured latent where ComfyUI's LoadLatent finds it (``input/<name>``); returns the name."""
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(input_dir)
    folder.mkdir(parents=True, exist_ok=True)
    # latent_format_version_0 marks it as a latent LoadLatent must not rescale
    save_file({"latent_tensor": structured_latent(shape, seed), "latent_format_version_0": torch.tensor([])},
              str(folder / name))
    return name
