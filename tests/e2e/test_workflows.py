"""Every shipped workflow runs, as shipped, through /prompt on a server started like `make run`,
one API file per UI workflow. (That each API file is what the page exports from its UI source is
checked on the page itself: tests/e2e/test_page.py.)"""

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
UI_WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))  # what the template browser lists
ALL_WORKFLOWS = sorted((REPO / "workflows" / "api").glob("*.json"))
WORKFLOWS = [w for w in ALL_WORKFLOWS if w.stem not in TESTED_ELSEWHERE]
DEMO_CONFIG = REPO / "scripts" / "demo_preload_config.json"
TEXT_ONLY = {"memkit_cache_info"}  # its outputs are text shown on the nodes
# Workflows that save an animation (SaveAnimatedWEBP): (frames, height, width) of the one file each saves;
# every other workflow saves 256x256 images.
ANIMATIONS = {"memkit_wan21_video_tiled_decode": (9, 128, 128)}  # a Wan 2.1 latent of 3 frames, 16x16


@pytest.fixture(scope="module")
def demo_server(start_server):
    """As `make run` starts it: the demo config, verbatim (background preload)."""
    server = start_server(None, config_file=DEMO_CONFIG)
    server.wait_ready()
    assert server.get("/memkit/status")["preload"]["failed"] == 0
    return server


def test_workflows_are_shipped_and_each_is_tested():
    assert len(WORKFLOWS) >= 3
    assert [w.name for w in ALL_WORKFLOWS] == [w.name for w in UI_WORKFLOWS], "one API export per UI workflow"
    for stem, test_file in TESTED_ELSEWHERE.items():
        assert (REPO / "workflows" / "api" / f"{stem}.json").is_file()
        assert f"workflows\" / \"api\" / \"{stem}.json" in (Path(__file__).parent / test_file).read_text()


def check_cache_info_outputs(outputs: dict) -> None:
    """memkit_cache_info: the table lists the demo entries; the status nodes find them by key and by file."""
    table, by_key, by_file = ("\n".join(outputs[node]["text"]) for node in ("1", "2", "3"))
    for key in ("demo-sd15", "demo-clip-l", "demo-sd-vae"):
        assert key in table, table
    assert by_key.startswith("demo-sd15: checkpoint,"), by_key
    assert by_file.startswith("demo-sd-vae: vae,"), by_file


def animation_frames(path: Path) -> list[np.ndarray]:
    """Every frame of an animated WEBP, as float RGB arrays."""
    with Image.open(path) as animation:
        assert animation.format == "WEBP", path.name
        assert getattr(animation, "is_animated", False), f"{path.name}: not animated"
        frames = []
        for index in range(animation.n_frames):
            animation.seek(index)
            frames.append(np.asarray(animation.convert("RGB"), dtype=np.float32))
    return frames


def check_animation(server, outputs: dict, shape: tuple[int, int, int]) -> None:
    """One animated WEBP with shape's (frames, height, width); every frame finite and not flat."""
    saved = [(image, output.get("animated")) for output in outputs.values() for image in output.get("images", [])]
    assert len(saved) == 1, saved
    image, animated = saved[0]
    assert image["filename"].endswith(".webp"), saved
    assert animated == [True], saved
    frames = animation_frames(server.output_file(image))
    assert (len(frames), *frames[0].shape[:2]) == shape
    for frame in frames:
        assert frame.shape == (*shape[1:], 3)
        assert np.isfinite(frame).all()
        assert frame.std() > 0, "a flat frame"


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_shipped_workflow_runs(demo_server, workflow):
    loads_before = demo_server.get("/memkit/status")["totals"]["loads"]
    outputs = demo_server.run_prompt(json.loads(workflow.read_text()))
    if workflow.stem in TEXT_ONLY:
        check_cache_info_outputs(outputs)
    elif workflow.stem in ANIMATIONS:
        check_animation(demo_server, outputs, ANIMATIONS[workflow.stem])
    else:
        images = [image for output in outputs.values() for image in output.get("images", [])]
        assert images, f"{workflow.name} saved no image"
        for image in images:
            pixels = np.asarray(Image.open(demo_server.output_file(image)), dtype=np.float32)
            assert pixels.shape[:2] == (256, 256)
            assert pixels.std() > 0
    assert demo_server.get("/memkit/status")["totals"]["loads"] == loads_before, "demo models are preloaded"
