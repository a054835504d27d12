"""A real ComfyUI server in a subprocess, with this package installed, for end-to-end tests.

The shape follows ComfyUI's own tests/execution: start main.py --cpu on a free loopback port,
submit API-format prompts to /prompt, follow /history. The server is always stopped.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from host import prepare_base  # noqa: E402  (scripts/host.py: the same base directory as `make run`)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PromptFailedError(AssertionError):
    pass


class ComfyServer:
    def __init__(self, base: Path, models: Path, config: Path | None, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, node_packs: list[Path] | None = None) -> None:
        self.base = base
        self.models = models
        self.config = config
        self.extra_args = extra_args or []
        self.extra_env = env or {}
        self.node_packs = node_packs or []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log_path = base / "server.log"
        self.client_id = uuid.uuid4().hex

    # --- life cycle -----------------------------------------------------------------------

    def start(self, timeout: float = 240) -> ComfyServer:
        paths = prepare_base(self.base, self.models) / "extra_model_paths.yaml"
        for pack in self.node_packs:  # test-only node packs, linked like the package itself
            link = self.base / "custom_nodes" / pack.name
            if not link.exists():
                link.symlink_to(pack, target_is_directory=True)
        comfy = Path(os.environ["MEMKIT_COMFYUI"])
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **self.extra_env}
        if self.config is not None:
            env["MEMKIT_PRELOAD_CONFIG"] = str(self.config)
        cmd = [os.environ.get("MEMKIT_PYTHON_HOST", sys.executable), str(comfy / "main.py"), "--cpu",
               "--listen", "127.0.0.1", "--port", str(self.port), "--base-directory", str(self.base),
               "--extra-model-paths-config", str(paths), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", *self.extra_args]
        self.log_file = self.log_path.open("w")
        self.process = subprocess.Popen(cmd, cwd=comfy, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not start in {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(20)
        self.log_file.close()
        self.process = None

    def log(self, whole: bool = False) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text if whole else text[-8000:]

    def problems(self) -> list[str]:
        """Tracebacks and failed nodes in the whole log, less ComfyUI's own known noise: the optional
        imports it reports at start-up (audio nodes without torchaudio) and SQLAlchemy closing one of
        ComfyUI's database connections from the thread that garbage-collected it."""
        text = self.log(whole=True)
        blocks = re.split(r"(?=Traceback \(most recent call last\))", text)[1:]
        noise = ("No module named 'torchaudio'", "sqlalchemy/pool/base.py")
        found = [b[:1500] for b in blocks if not any(n in b.split("\n\n", 1)[0] for n in noise)]
        found += [line for line in text.splitlines() if "Exception during processing" in line]
        return found

    # --- HTTP -----------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, payload = error.code, error.read()
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload.decode(errors="replace")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.loads(response.read())

    def wait_ready(self, timeout: float = 300) -> list[int]:
        """Poll /memkit/ready until 200; returns every status seen (503s while preloading)."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, _ = self.request("GET", "/memkit/ready")
            seen.append(status)
            if status == 200:
                return seen
            time.sleep(0.2)
        raise TimeoutError(f"/memkit/ready never answered 200: {seen[-5:]}\n{self.log()}")

    # --- prompts --------------------------------------------------------------------------

    def run_prompt(self, prompt: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        status, answer = self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise PromptFailedError(f"/prompt refused the prompt ({status}): {answer}")
        return self.wait_for(answer["prompt_id"], timeout)

    def wait_for(self, prompt_id: str, timeout: float = 600) -> dict[str, Any]:
        """Wait for a queued prompt; its outputs, or PromptFailedError with ComfyUI's messages."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                item = history[prompt_id]
                if item["status"]["status_str"] != "success":
                    raise PromptFailedError(f"prompt failed: {json.dumps(item['status']['messages'])[:4000]}")
                return item["outputs"]
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s\n{self.log()}")

    def output_file(self, image: dict[str, str]) -> Path:
        return self.base / "output" / image.get("subfolder", "") / image["filename"]
