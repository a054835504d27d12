"""Serverless start-up through real servers: readiness states, the warm-up workflow, models in
process memory (what a memory snapshot keeps), and the RunPod-style example run for real."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from support.comfy_server import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SD_VAE = "memkit-sd-vae.safetensors"
CKPT = "memkit-wan-tiny-a.safetensors"
MODELS = {"checkpoints": [{"name": CKPT, "cache_key": "tiny"}], "vaes": [{"vae_name": SD_VAE, "cache_key": "vae"}]}
# Heavy enough on a CPU (a 512x512 decode) that the warming state is seen
WARMUP = {
    "1": {"class_type": "MemKitVAESelector", "inputs": {"cache_key": "vae"}},
    "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
    "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}},
    "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
}


def write_config(folder: Path, warmup: dict | None, **settings) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if warmup is not None:
        (folder / "warmup_api.json").write_text(json.dumps(warmup))
        settings["warmup_workflow"] = "warmup_api.json"
    path = folder / "preload_config.json"
    path.write_text(json.dumps({"settings": settings, "models": MODELS}))
    return path


def ready_states(server, timeout: float = 300) -> list[tuple[int, str]]:
    """Every (status, state) /memkit/ready answered until the first 200."""
    seen = []
    deadline = time.monotonic() + timeout
    while not seen or seen[-1][0] != 200:
        assert time.monotonic() < deadline, f"/memkit/ready stuck: {seen}"
        status, answer = server.request("GET", "/memkit/ready")
        if not seen or seen[-1] != (status, answer["state"]):
            seen.append((status, answer["state"]))
    return seen


@pytest.fixture(scope="module")
def warm_server(start_server, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("warm"), WARMUP, preload_mode="blocking")
    server = start_server(None, config_file=config)
    server.states = ready_states(server)
    return server


def test_ready_turns_200_only_after_the_warmup_workflow_ran(warm_server):
    assert warm_server.states[0] == (503, "warming"), "a blocking preload serves with the models loaded, then warms"
    assert warm_server.states[-1] == (200, "ready")
    history = warm_server.get("/history")
    warmups = [item for item in history.values()
               if {n["class_type"] for n in item["prompt"][2].values()} == {n["class_type"] for n in WARMUP.values()}]
    assert len(warmups) == 1
    assert warmups[0]["status"]["status_str"] == "success"
    status = warm_server.get("/memkit/status")
    assert status["preload"]["state"] == "ready"
    assert status["totals"]["loads"] == 2, "the warm-up used the preloaded VAE"


def test_blocking_preload_holds_the_models_in_process_memory_not_in_file_pages(warm_server):
    """What a memory snapshot keeps: anonymous memory. A model still mapped from its file would be
    read from disk again after a restore."""
    process = psutil.Process(warm_server.process.pid)
    mapped = {m.path for m in process.memory_maps()}
    model_files = {str(p.resolve()) for p in (warm_server.models / "vae", warm_server.models / "checkpoints")
                   for p in p.iterdir()}
    assert not mapped & model_files
    held = warm_server.get("/memkit/status")["totals"]["ram_bytes"]
    assert held > 100 * 2**20
    assert process.memory_info().rss > held


def test_a_failing_warmup_leaves_the_server_degraded_not_stuck(start_server, tmp_path_factory):
    broken = {**WARMUP, "1": {"class_type": "MemKitVAESelector", "inputs": {"cache_key": "no-such-key"}}}
    config = write_config(tmp_path_factory.mktemp("degraded"), broken, preload_mode="blocking")
    server = start_server(None, config_file=config)
    assert ready_states(server)[-1] == (200, "degraded")
    answer = server.get("/memkit/ready")
    assert "no-such-key" in answer["warmup_error"]
    assert "the warm-up workflow failed" in server.log()


def test_the_runpod_style_start_script_waits_for_ready_then_runs_the_handler(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    from host import prepare_base

    base = prepare_base(tmp_path / "base", Path(os.environ["MEMKIT_MODELS"]))
    config = write_config(tmp_path / "config", WARMUP, preload_mode="background")
    workflow = tmp_path / "job.json"
    workflow.write_text(json.dumps({**WARMUP, "4": {"class_type": "SaveImage",
                                                    "inputs": {"images": ["3", 0], "filename_prefix": "job"}}}))
    port, pidfile = free_port(), tmp_path / "comfy.pid"
    env = {**os.environ, "COMFYUI_DIR": os.environ["MEMKIT_COMFYUI"], "COMFY_PORT": str(port),
           "PYTHON": os.environ.get("MEMKIT_PYTHON_HOST", sys.executable), "COMFY_PIDFILE": str(pidfile),
           "COMFY_LOG": str(tmp_path / "comfyui.log"),
           "MEMKIT_PRELOAD_CONFIG": str(config), "HF_HUB_OFFLINE": "1",
           "COMFY_ARGS": f"--cpu --base-directory {base} --extra-model-paths-config {base / 'extra_model_paths.yaml'} "
                         "--database-url sqlite:///:memory: --disable-auto-launch"}
    handler = [env["PYTHON"], str(REPO / "deploy" / "runpod_worker" / "handler.py"), str(workflow)]
    try:
        done = subprocess.run([str(REPO / "deploy" / "runpod_worker" / "start.sh"), *handler], env=env,
                              capture_output=True, text=True, timeout=300, check=False)
    finally:
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    ready = json.loads(lines[0].removeprefix("memkit ready: "))
    assert ready["state"] == "ready", "the handler starts only after the preload and the warm-up"
    outputs = json.loads(lines[-1])["outputs"]
    (files,) = outputs.values()
    assert (base / "output" / files[0]).is_file()


def test_a_preload_or_warmup_prompt_removed_from_the_queue_never_leaves_ready_stuck(start_server, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("removed"), WARMUP, preload_mode="background")
    server = start_server(None, config_file=config)
    long_prompt = {**WARMUP, "1": {"class_type": "VAELoader", "inputs": {"vae_name": SD_VAE}},
                   "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 768, "height": 768, "batch_size": 1}}}
    status, answer = server.request("POST", "/prompt", {"prompt": long_prompt, "client_id": server.client_id})
    assert status == 200
    deadline = time.monotonic() + 120
    removed = None
    while removed is None:  # whichever MemKit prompt (preload, then warm-up) waits behind the long one
        assert time.monotonic() < deadline, "no MemKit prompt was ever pending"
        queue = server.get("/queue")
        running = [entry[1] for entry in queue["queue_running"]]
        for entry in queue["queue_pending"]:
            kinds = {n["class_type"] for n in entry[2].values()}
            if answer["prompt_id"] in running and kinds & {"MemKitPreload", "MemKitVAESelector"}:
                removed = "preload" if "MemKitPreload" in kinds else "warmup"
                assert server.request("POST", "/queue", {"delete": [entry[1]]})[0] == 200
    server.wait_for(answer["prompt_id"])
    assert ready_states(server)[-1] == (200, "degraded")
    ready = server.get("/memkit/ready")
    if removed == "preload":
        # both entries were reported failed; the warm-up then loaded "vae" through its selector
        assert ready["failed"] == ["tiny"]
        assert ready["warmup_error"] is None
        failures = {e["cache_key"]: e["error"] for e in server.get("/memkit/status")["entries"]
                    if e["state"] == "failed"}
        assert "the preload prompt did not run: removed from ComfyUI's queue before it ran" in failures["tiny"]
    else:
        assert ready["warmup_error"] == "removed from ComfyUI's queue before it ran"
