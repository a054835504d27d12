"""Every documented config, as written, through a real server: the README's example and the
shipped preload_config.json (its entries enabled and named after test models), plus a prompt
that runs while a preload is under way."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.latents import write_latent_input

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# The documented names stand for real files; these seeded test models play their roles.
TEST_MODELS = {
    "sd_xl_base_1.0.safetensors": "memkit-wan-tiny-a.safetensors",
    "clip_l.safetensors": "memkit-clip-l.safetensors",
    "clip_g.safetensors": "memkit-clip-g.safetensors",
    "wan2.1_t2v_1.3B_fp16.safetensors": "memkit-wan21-t2v-tiny.safetensors",
    "wan_2.1_vae.safetensors": "memkit-wan21-vae-tiny.safetensors",
    "clip_vision_h.safetensors": "memkit-clip-vision-vitl.safetensors",
    "wav2vec2_chinese_base_fp16.safetensors": "memkit-wav2vec2-base.safetensors",
    "4x-UltraSharp.pth": "memkit-esrgan-compact-x2.safetensors",
}
SELECTORS = {"checkpoints": "MemKitCheckpointSelector", "text_encoders": "MemKitTextEncoderSelector",
             "diffusion_models": "MemKitDiffusionModelSelector", "vaes": "MemKitVAESelector",
             "nodes": "MemKitCachedNode"}
LATENT = "memkit-configs.latent"


def readme_example() -> dict:
    """The JSON block of README.md's preload_config.json section, parsed as a user would copy it."""
    section = (REPO / "README.md").read_text().split("## preload_config.json", 1)[1]
    return json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))


def with_test_models(config: dict, enable: bool = False) -> dict:
    """The same config with each documented file name replaced by its test model (and enabled)."""
    text = json.dumps(config)
    for documented, test_model in TEST_MODELS.items():
        text = text.replace(json.dumps(documented), json.dumps(test_model))
    mapped = json.loads(text)
    for entries in mapped["models"].values():
        for entry in entries:
            if enable:
                entry["enabled"] = True
    return mapped


def start_with(start_server, tmp_path_factory, config: dict):
    path = tmp_path_factory.mktemp("config") / "preload_config.json"
    path.write_text(json.dumps(config, indent=2))
    return start_server(None, config_file=path)


def selector_prompt(config: dict) -> dict:
    """Every configured cache key through its selector, each output shown by PreviewAny."""
    prompt, index = {}, 0
    for section, entries in config["models"].items():
        for entry in entries:
            index += 1
            prompt[str(index)] = {"class_type": SELECTORS[section], "inputs": {"cache_key": entry["cache_key"]}}
            prompt[f"{index}p"] = {"class_type": "PreviewAny", "inputs": {"source": [str(index), 0]}}
    return prompt


def assert_all_ready(server, config: dict) -> None:
    status = server.get("/memkit/status")
    assert status["config"]["problems"] == []
    assert status["preload"]["failed"] == 0, status["entries"]
    states = {e["cache_key"]: e["state"] for e in status["entries"]}
    keys = [e["cache_key"] for entries in config["models"].values() for e in entries]
    assert {k: states.get(k) for k in keys} == dict.fromkeys(keys, "ready")
    assert server.problems() == []


def test_the_readme_example_config_loads_as_written(start_server, tmp_path_factory):
    example = readme_example()
    assert example["settings"]["auto_gpu_load"] is True, "the README documents the GPU-placing setup"
    config = with_test_models(example)
    server = start_with(start_server, tmp_path_factory, config)
    server.wait_ready()
    assert_all_ready(server, config)
    loads = server.get("/memkit/status")["totals"]["loads"]
    server.run_prompt(selector_prompt(config))
    assert server.get("/memkit/status")["totals"]["loads"] == loads, "every selector is a cache hit"


def decode_prompt(vae_loader: str, prefix: str) -> dict:
    return {
        "1": {"class_type": "LoadLatent", "inputs": {"latent": LATENT}},
        "2": {"class_type": vae_loader, "inputs": {"vae_name": "memkit-sd-vae.safetensors"}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
    }


def saved(server, outputs: dict) -> np.ndarray:
    (image,) = [i for o in outputs.values() for i in o.get("images", [])]
    return np.asarray(Image.open(server.output_file(image)), dtype=np.int16)


def test_the_shipped_config_loads_and_a_prompt_runs_beside_its_preload(start_server, tmp_path_factory):
    shipped = json.loads((REPO / "preload_config.json").read_text())
    config = with_test_models(shipped, enable=True)
    assert len(config["models"]["text_encoders"]) == 2
    assert [e["node"] for e in config["models"]["nodes"]] == ["CLIPVisionLoader", "AudioEncoderLoader",
                                                              "UpscaleModelLoader"]
    server = start_with(start_server, tmp_path_factory, config)
    write_latent_input(server.base / "input", LATENT, (1, 4, 16, 16), 11)
    status, answer = server.request("POST", "/prompt", {"prompt": decode_prompt("VAELoader", "during"),
                                                        "client_id": server.client_id})
    assert status == 200
    assert server.request("GET", "/memkit/ready")[0] == 503, "the prompt was queued while the preload ran"
    during = saved(server, server.wait_for(answer["prompt_id"]))
    server.wait_ready()
    assert_all_ready(server, config)
    reference = saved(server, server.run_prompt(decode_prompt("MemKitVAELoader", "after")))
    assert during.std() > 0
    assert np.array_equal(during, reference)
    server.run_prompt(selector_prompt(config))
    assert server.problems() == []
