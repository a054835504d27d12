"""ComfyUI with comfyui-memkit on Modal, started from a memory snapshot.

What Modal does (its documentation, not assumed further here): with ``enable_memory_snapshot``,
the first containers run the ``@modal.enter(snap=True)`` hooks, Modal saves the container's memory,
and later cold starts restore that memory instead of running those hooks again; hooks with
``snap=False`` run after every start or restore. CPU memory snapshots are taken without a GPU
attached; GPU memory snapshots (``enable_gpu_snapshot``, alpha at the time of writing) keep the
GPU attached and save its memory too.

What MemKit does: with ``preload_mode: "blocking"`` the models are in ordinary process memory
before ComfyUI serves (not pages still backed by the model files), so they are in the snapshot;
``auto_gpu_load`` places them on the GPU on ComfyUI's executing thread, and ``/memkit/ready``
answers 200 when that (and the warm-up workflow, if configured) is done.

Why GPU snapshots here: ComfyUI picks its device when it starts. Started without a GPU (a CPU
snapshot) it would stay a CPU ComfyUI after the restore; MemKit does not patch ComfyUI to change
that. With a CPU-only snapshot, run ComfyUI in the ``snap=False`` hook instead and keep only the
Python imports in the snapshot.

Deploy: ``modal deploy deploy/modal_snapshot/comfyui_memkit_app.py`` (models in the ``comfyui-models``
volume, laid out as ComfyUI's models folder; the preload config next to this file).
Try: ``modal run deploy/modal_snapshot/comfyui_memkit_app.py --workflow my_workflow_api.json``.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import modal

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
COMFY_PORT = 8188
COMFY_URL = f"http://127.0.0.1:{COMFY_PORT}"
COMFY_DIR = "/root/comfy/ComfyUI"

image = (
    modal.Image.debian_slim(python_version="3.11")
    .apt_install("git")
    .pip_install("comfy-cli")
    .run_commands("comfy --skip-prompt install --fast-deps --nvidia")
    .add_local_dir(REPO, f"{COMFY_DIR}/custom_nodes/comfyui-memkit", copy=True,
                   ignore=[".git", "**/__pycache__", "*.safetensors"])
    .add_local_dir(HERE, "/root/memkit", copy=True, ignore=["*.py"])  # the config and its warm-up workflow
)
models = modal.Volume.from_name("comfyui-models", create_if_missing=True)
app = modal.App("comfyui-memkit", image=image)


def _get(path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(COMFY_URL + path, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _post(path: str, body: dict) -> dict:
    request = urllib.request.Request(COMFY_URL + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def wait_until_ready(timeout: float = 1800) -> dict:
    """Poll /memkit/ready: 503 while starting, preloading or warming; 200 when ready (or degraded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, answer = _get("/memkit/ready")
        except OSError:  # not listening yet
            status, answer = 0, {}
        if status == 200:
            return answer
        time.sleep(0.5)
    raise TimeoutError(f"ComfyUI was not ready within {timeout} s")


@app.cls(gpu="L40S", volumes={"/root/comfy/ComfyUI/models": models}, enable_memory_snapshot=True,
         experimental_options={"enable_gpu_snapshot": True}, timeout=3600, scaledown_window=300)
class ComfyUI:
    @modal.enter(snap=True)
    def start_and_preload(self) -> None:
        """Runs once, before the snapshot: ComfyUI starts and MemKit loads every model."""
        self.server = subprocess.Popen(
            ["python", "main.py", "--listen", "127.0.0.1", "--port", str(COMFY_PORT)], cwd=COMFY_DIR,
            env={"MEMKIT_PRELOAD_CONFIG": "/root/memkit/preload_config.json", "PATH": "/usr/local/bin:/usr/bin:/bin"})
        print("memkit:", wait_until_ready())

    @modal.enter(snap=False)
    def after_restore(self) -> None:
        """Runs after every start or restore: the models were restored with the process."""
        print("memkit after restore:", wait_until_ready())

    @modal.method()
    def run(self, workflow: dict) -> dict:
        """Queue an API-format workflow and return its outputs (file names per output node)."""
        prompt_id = _post("/prompt", {"prompt": workflow})["prompt_id"]
        while True:
            _, history = _get(f"/history/{prompt_id}")
            if prompt_id in history:
                item = history[prompt_id]
                if item["status"]["status_str"] != "success":
                    raise RuntimeError(json.dumps(item["status"]["messages"])[:2000])
                return item["outputs"]
            time.sleep(0.2)


@app.local_entrypoint()
def main(workflow: str) -> None:
    print(json.dumps(ComfyUI().run.remote(json.loads(Path(workflow).read_text())), indent=2))
