"""A RunPod-style serverless handler: run an API-format workflow on the local ComfyUI.

``start.sh`` starts ComfyUI and runs this only once ``/memkit/ready`` answers 200, so the first
job finds its models in memory. The job's input is ``{"workflow": {...}}`` (API format, as
``Export (API)`` saves it); the answer lists the files each output node wrote.

Run under RunPod with its SDK installed in the worker image (``pip install runpod``):
``./start.sh python -u handler.py``. Without the SDK, ``python handler.py workflow.json`` runs
one workflow and prints the answer, which is how it is tested here.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
import uuid
from typing import Any

COMFY_URL = os.environ.get("COMFY_URL", f"http://127.0.0.1:{os.environ.get('COMFY_PORT', '8188')}")


def _call(method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(COMFY_URL + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def run_workflow(workflow: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Queue the workflow, wait for it, return its outputs; raises with ComfyUI's reason on failure."""
    prompt_id = _call("POST", "/prompt", {"prompt": workflow, "client_id": uuid.uuid4().hex})["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = _call("GET", f"/history/{prompt_id}").get(prompt_id)
        if item is not None:
            if item["status"]["status_str"] != "success":
                raise RuntimeError(f"workflow failed: {json.dumps(item['status']['messages'])[:2000]}")
            return {node: [f["filename"] for key in ("images", "gifs", "videos") for f in out.get(key, [])]
                    for node, out in item["outputs"].items()}
        time.sleep(0.2)
    raise TimeoutError(f"workflow {prompt_id} did not finish in {timeout} s")


def handler(job: dict[str, Any]) -> dict[str, Any]:
    """The RunPod entry point: one job, one workflow."""
    return {"outputs": run_workflow(job["input"]["workflow"])}


def main() -> None:
    if len(sys.argv) == 2:
        with open(sys.argv[1], encoding="utf-8") as handle:
            print(json.dumps(handler({"input": {"workflow": json.load(handle)}})))
        return
    import runpod  # the worker image's SDK

    runpod.serverless.start({"handler": handler})


if __name__ == "__main__":
    main()
