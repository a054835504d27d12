"""MemKitTiledVAEDecode through a real server's /prompt: LoadLatent -> VAELoader -> tiled decode -> SaveImage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from support.latents import write_latent_input
from support.metrics import psnr

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LATENT_FILE = "memkit-e2e.latent"
TILES = {"tile_x": 128, "tile_y": 128, "tile_stride_x": 96, "tile_stride_y": 96, "temporal_size": 64,
         "temporal_stride": 48, "auto": False}


@pytest.fixture(scope="module")
def server(start_server):
    server = start_server(None)
    write_latent_input(server.base / "input", LATENT_FILE, (1, 4, 24, 32), 7)
    return server


def decode_prompt(**tiles) -> dict:
    return {
        "1": {"class_type": "LoadLatent", "inputs": {"latent": LATENT_FILE}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "memkit-sd-vae.safetensors"}},
        "3": {"class_type": "MemKitTiledVAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0], **TILES, **tiles}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "tiled"}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "untiled"}},
    }


def saved(server, outputs: dict, node: str) -> np.ndarray:
    image = outputs[node]["images"][0]
    return np.asarray(Image.open(server.output_file(image)), dtype=np.float32) / 255.0


def test_tiled_decode_runs_through_prompt_close_to_vae_decode(server):
    outputs = server.run_prompt(decode_prompt())
    tiled, untiled = saved(server, outputs, "4"), saved(server, outputs, "6")
    assert tiled.shape == untiled.shape == (192, 256, 3)
    assert np.isfinite(tiled).all()
    assert tiled.std() > 0.01
    # the in-process test's tolerance, after 8-bit rounding
    assert psnr(torch.from_numpy(untiled), torch.from_numpy(tiled)) >= 19.0


def test_invalid_tiles_are_refused_by_prompt_validation_naming_the_input(server):
    prompt = {node: value for node, value in decode_prompt(tile_stride_x=128).items() if node in "1234"}
    status, answer = server.request("POST", "/prompt", {"prompt": prompt})
    assert status == 400
    details = " ".join(error["details"] for error in answer["node_errors"]["3"]["errors"])
    assert "tile_x (128) must be greater than tile_stride_x (128)" in details
    assert server.get("/system_stats")  # the server keeps serving
