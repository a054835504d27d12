"""Every shipped workflow runs, as shipped, through /prompt on a server started like `make run`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# Workflows that name real models `make run` does not provide run with stand-ins in their own test.
TESTED_ELSEWHERE = {"memkit_wan21_t2v": "test_video_caches_server.py"}
ALL_WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
WORKFLOWS = [w for w in ALL_WORKFLOWS if w.stem not in TESTED_ELSEWHERE]
DEMO_CONFIG = REPO / "scripts" / "demo_preload_config.json"


@pytest.fixture(scope="module")
def demo_server(start_server):
    """As `make run` starts it: the demo config, verbatim (background preload)."""
    server = start_server(None, config_file=DEMO_CONFIG)
    server.wait_ready()
    assert server.get("/memkit/status")["preload"]["failed"] == 0
    return server


def test_workflows_are_shipped_and_each_is_tested():
    assert len(WORKFLOWS) >= 2
    for stem, test_file in TESTED_ELSEWHERE.items():
        assert (REPO / "workflows" / f"{stem}.json").is_file()
        assert f"workflows\" / \"{stem}.json" in (Path(__file__).parent / test_file).read_text()


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_shipped_workflow_runs(demo_server, workflow):
    loads_before = demo_server.get("/memkit/status")["totals"]["loads"]
    outputs = demo_server.run_prompt(json.loads(workflow.read_text()))
    images = [image for output in outputs.values() for image in output.get("images", [])]
    assert images, f"{workflow.name} saved no image"
    for image in images:
        pixels = np.asarray(Image.open(demo_server.output_file(image)), dtype=np.float32)
        assert pixels.shape[:2] == (256, 256)
        assert pixels.std() > 0
    assert demo_server.get("/memkit/status")["totals"]["loads"] == loads_before, "demo models are preloaded"
