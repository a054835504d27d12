"""One copy per host: ComfyUI servers with the same preload config and ``shared_weights`` on.

The first server loads the SD1.5 checkpoint from its file and writes the store; a second server
started beside it maps the same file. (A process started after every other one stopped takes the
same path as the second server: tests/host/test_shared_weights.py builds from a store nothing maps,
and BENCHMARKS.md times a restarted server.) Each check compares with what only a working store can give:
the checkpoint's pages stay out of the page cache while a server starts from the store, a server's
proportional memory (PSS) counts the shared pages half, and a weight edited in place in one server
shows in neither the other server nor the store.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from comfy_execution.graph_utils import GraphBuilder
from PIL import Image
from support.memory import drop_from_page_cache, resident_bytes, smaps_rollup

from comfyui_memkit.model_cache.weight_store import WeightStore

pytestmark = pytest.mark.e2e

SD15 = "memkit-sd15.safetensors"
CONFIG = {"checkpoints": [{"name": SD15, "cache_key": "sd15"}]}


@pytest.fixture(scope="module")
def store_dir():
    directory = Path("/dev/shm") / f"memkit-e2e-{uuid.uuid4().hex[:8]}"
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return Path(os.environ["MEMKIT_MODELS"]) / "checkpoints" / SD15


@pytest.fixture(scope="module")
def start_sharing(start_server, store_dir):
    def start():
        server = start_server(CONFIG, preload_mode="background",
                              shared_weights={"enabled": True, "directory": str(store_dir)})
        server.wait_ready()
        return server
    return start


def image_prompt(edit_in_place: bool = False, prefix: str = "shared") -> dict:
    graph = GraphBuilder()
    ckpt = graph.node("MemKitCheckpointSelector", cache_key="sd15")
    model = ckpt.out(0)
    if edit_in_place:
        model = graph.node("MemKitTestEditWeightsInPlace", model=model).out(0)
    positive = graph.node("CLIPTextEncode", clip=ckpt.out(1), text="a lighthouse at dusk")
    negative = graph.node("CLIPTextEncode", clip=ckpt.out(1), text="")
    latent = graph.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampled = graph.node("KSampler", model=model, positive=positive.out(0), negative=negative.out(0),
                         latent_image=latent.out(0), seed=11, steps=2, cfg=5.0, sampler_name="euler",
                         scheduler="normal", denoise=1.0)
    decoded = graph.node("VAEDecode", samples=sampled.out(0), vae=ckpt.out(2))
    graph.node("SaveImage", images=decoded.out(0), filename_prefix=f"{prefix}_{int(edit_in_place)}")
    return graph.finalize()


def image(server, edit_in_place: bool = False) -> np.ndarray:
    outputs = server.run_prompt(image_prompt(edit_in_place))
    (node_output,) = [o for o in outputs.values() if "images" in o]
    pixels = np.asarray(Image.open(server.output_file(node_output["images"][0])), dtype=np.int16)
    assert pixels.std() > 0, "a flat image would make the comparisons meaningless"
    return pixels


def row(server) -> dict:
    (found,) = [e for e in server.get("/memkit/status")["entries"] if e["cache_key"] == "sd15"]
    return found


@pytest.fixture(scope="module")
def host(start_sharing, checkpoint):
    """The first server (it writes the store) and a second one beside it (it maps the store)."""
    first = start_sharing()
    written = row(first)
    first_image = image(first)
    drop_from_page_cache(checkpoint)
    second = start_sharing()
    return {"written": written, "first_image": first_image, "first": first, "second": second,
            "read_by_second": resident_bytes(checkpoint)}


def test_the_first_server_writes_the_store_and_keeps_no_private_copy(host, store_dir):
    written = host["written"]
    assert written["sharing"]["state"] == "written", written["sharing"]
    assert written["shared_bytes"] > 3 << 30, "the checkpoint's MODEL, CLIP and VAE are on the store's mapping"
    assert written["ram_bytes"] < 64 << 20, "its private copy went once the store held it"
    assert len(list(store_dir.glob("*.weights"))) == 1


def test_a_second_server_maps_the_store_without_reading_the_checkpoint(host):
    entry = row(host["second"])
    assert entry["sharing"]["state"] == "mapped", entry["sharing"]
    assert entry["ram_bytes"] < 64 << 20
    assert host["read_by_second"] < 1 << 20, f"the second server read {host['read_by_second']} bytes"
    # what a load from the file (and the write) took, against what the second server took
    assert entry["load_seconds"] < 0.5 * host["written"]["load_seconds"]


def test_both_servers_draw_the_same_image(host):
    assert np.array_equal(image(host["second"]), host["first_image"])
    assert np.array_equal(image(host["first"]), host["first_image"])


def test_the_shared_pages_count_half_in_each_servers_memory(host):
    first, second = host["first"], host["second"]
    image(first)
    image(second)  # both have read every weight now
    shared = row(second)["shared_bytes"]
    assert row(second)["sharing"]["processes"] == 2
    for server in (first, second):
        pid = server.process.pid
        rss, pss = smaps_rollup(pid, "Rss"), smaps_rollup(pid, "Pss")
        assert pss < rss - 0.4 * shared, f"PSS {pss / 2**30:.2f} GB, RSS {rss / 2**30:.2f} GB, shared {shared}"


def test_a_weight_edited_in_place_stays_in_the_server_that_edited_it(host, store_dir):
    first, second = host["first"], host["second"]
    store = WeightStore(store_dir, 1 << 40)
    (key,) = store.keys()
    name = "0.diffusion_model.input_blocks.0.0.weight"  # what MemKitTestEditWeightsInPlace writes into
    stored = store.open(key)
    before = stored.tensors()[name].clone()
    stored.close()
    edited = image(first, edit_in_place=True)
    assert np.abs(edited - host["first_image"]).max() > 10, "the edit must visibly change the image"
    assert np.array_equal(image(second), host["first_image"]), "the other server never sees the edit"
    deadline = time.monotonic() + 60  # status sizes are as last measured (every few seconds)
    while (entry := row(first))["sharing"]["state"] != "lost" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert entry["sharing"]["state"] == "lost", entry["sharing"]
    edited_bytes = before.numel() * before.element_size()  # 320x4x3x3 float32: 45 KB
    assert entry["ram_bytes"] >= edited_bytes, "the pages the edit copied are that server's private RAM"
    stored = store.open(key)  # the store file itself never changes
    assert torch.equal(stored.tensors()[name], before)
    stored.close()
    assert not first.problems()
    assert not second.problems()
