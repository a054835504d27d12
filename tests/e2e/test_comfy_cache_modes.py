"""The cached loaders under each of ComfyUI's own output caches, and its RAM-pressure release.

One server per mode. Two prompts use the same cached loaders with different latents, so ComfyUI
runs the decode again and either answers the loaders from its own cache (classic, LRU) or runs
them again (none, RAM pressure): MemKit must hand out the same cached models either way.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from support.latents import write_latent_input

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PINNED_VAE = "memkit-sd-vae.safetensors"
CONFIG = {"vaes": [{"vae_name": PINNED_VAE, "cache_key": "pinned-vae"}]}
MODES = {
    "classic": ["--cache-classic"],
    "lru": ["--cache-lru", "4"],
    "ram-pressure": ["--cache-ram", "100000"],  # a headroom no machine has: always under pressure
    "none": ["--cache-none"],
}


def prompt(latent: str, prefix: str, with_model: bool = True) -> dict:
    nodes = {
        "1": {"class_type": "LoadLatent", "inputs": {"latent": latent}},
        "2": {"class_type": "MemKitVAELoader", "inputs": {"vae_name": PINNED_VAE}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
        "5": {"class_type": "MemKitDiffusionModelLoader",
              "inputs": {"unet_name": "memkit-wan21-t2v-tiny.safetensors", "weight_dtype": "default"}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
    }
    if not with_model:
        del nodes["5"], nodes["6"]
    return nodes


@pytest.mark.parametrize("mode", MODES)
def test_cached_loaders_work_under_each_comfyui_cache_mode(start_server, mode):
    server = start_server(CONFIG, MODES[mode], preload_mode="blocking")
    for seed in (1, 2):
        write_latent_input(server.base / "input", f"modes-{seed}.latent", (1, 4, 16, 16), seed)
    images = []
    for seed in (1, 2):
        outputs = server.run_prompt(prompt(f"modes-{seed}.latent", f"{mode}-{seed}"))
        (image,) = [i for o in outputs.values() for i in o.get("images", [])]
        images.append(np.asarray(Image.open(server.output_file(image)), dtype=np.int16))
    assert not np.array_equal(images[0], images[1]), "both prompts decoded their own latent"
    status = server.get("/memkit/status")
    states = {e["cache_key"]: e for e in status["entries"]}
    assert states["pinned-vae"]["state"] == "ready", "pinned entries survive every mode"
    dm = "diffusion_model:memkit-wan21-t2v-tiny.safetensors"
    released = "RAM below ComfyUI's 100000.0 GB headroom: released " + dm
    if mode == "ram-pressure":
        assert released not in server.log(), "a model the running prompt uses is never released"
        server.run_prompt(prompt("modes-1.latent", f"{mode}-3", with_model=False))
        # before a hand-out MemKit releases unpinned entries the prompt does not use, as ComfyUI its outputs
        assert released in server.log()
        after = {e["cache_key"]: e["state"] for e in server.get("/memkit/status")["entries"]}
        assert after.get(dm) in (None, "evicted-held")
        assert after["pinned-vae"] == "ready"
        assert server.get("/memkit/status")["totals"]["loads"] == 2
    else:
        assert states[dm]["state"] == "ready"
        assert status["totals"]["loads"] == 2, "the pinned VAE (preloaded) and the diffusion model, once each"
        assert states[dm]["uses"] == 2, "each prompt's use is counted, also when ComfyUI's cache answered"
    assert server.problems() == []
    server.stop()
