"""The cache through a running ComfyUI: preload, /memkit routes, prompts on /prompt, LoRA isolation.

The server runs the documented design example's settings: background preload with
``auto_gpu_load: true``, every kind of entry.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from comfy_execution.graph_utils import GraphBuilder
from PIL import Image

pytestmark = pytest.mark.e2e

SD15 = "memkit-sd15.safetensors"
NODE_IDS = ["MemKitCheckpointLoader", "MemKitTextEncoderLoader", "MemKitDiffusionModelLoader", "MemKitVAELoader",
            "MemKitCheckpointSelector", "MemKitTextEncoderSelector", "MemKitDiffusionModelSelector",
            "MemKitVAESelector", "MemKitCacheInfo", "MemKitCacheStatus", "MemKitPreload", "MemKitTiledVAEDecode",
            "MemKitReleaseEvicted", "MemKitTextEncode", "MemKitTextEncodeByName", "MemKitCachedNode"]
CONFIG = {
    "checkpoints": [{"name": SD15, "cache_key": "e2e-sd15"}],
    "text_encoders": [{"clip_names": ["memkit-clip-l.safetensors"], "type": "stable_diffusion"}],
    "diffusion_models": [{"model_name": "memkit-wan21-t2v-tiny.safetensors", "weight_dtype": "default"}],
    "vaes": [{"vae_name": "memkit-sd-vae.safetensors", "cache_key": "e2e-sd-vae", "pinned": False},
             {"vae_name": "missing-vae.safetensors", "cache_key": "e2e-missing"}],
}


@pytest.fixture(scope="module")
def server(start_server):
    server = start_server(CONFIG, preload_mode="background", auto_gpu_load=True)
    server.ready_statuses = server.wait_ready()
    return server


def entries(server) -> dict[str, dict]:
    return {e["cache_key"]: e for e in server.get("/memkit/status")["entries"]}


def sd15_image_prompt(loader: str, lora: bool = False, seed: int = 7, patch_in_place: bool = False,
                      encoder: str = "CLIPTextEncode") -> dict:
    graph = GraphBuilder()
    if loader == "selector":
        ckpt = graph.node("MemKitCheckpointSelector", cache_key="e2e-sd15")
    elif loader == "memkit":
        ckpt = graph.node("MemKitCheckpointLoader", ckpt_name=SD15)
    else:
        ckpt = graph.node("CheckpointLoaderSimple", ckpt_name=SD15)
    model, clip = ckpt.out(0), ckpt.out(1)
    if lora:
        patched = graph.node("LoraLoader", model=model, clip=clip, lora_name="memkit-sd15-lora.safetensors",
                             strength_model=1.0, strength_clip=1.0)
        model, clip = patched.out(0), patched.out(1)
    if patch_in_place:
        patched = graph.node("MemKitTestPatchInPlace", model=model, clip=clip)
        model, clip = patched.out(0), patched.out(1)
        graph.node("PreviewAny", source=patched.out(2))
    positive = graph.node(encoder, clip=clip, text="a lighthouse at dusk")
    negative = graph.node(encoder, clip=clip, text="")
    latent = graph.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampled = graph.node("KSampler", model=model, positive=positive.out(0), negative=negative.out(0),
                         latent_image=latent.out(0), seed=seed, steps=2, cfg=5.0, sampler_name="euler",
                         scheduler="normal", denoise=1.0)
    decoded = graph.node("VAEDecode", samples=sampled.out(0), vae=ckpt.out(2))
    prefix = f"e2e_{loader}_{int(lora)}_{int(patch_in_place)}_{encoder}"
    graph.node("SaveImage", images=decoded.out(0), filename_prefix=prefix)
    return graph.finalize()


def saved_pixels(server, outputs: dict) -> np.ndarray:
    (node_output,) = [o for o in outputs.values() if "images" in o]
    pixels = np.asarray(Image.open(server.output_file(node_output["images"][0])), dtype=np.int16)
    assert pixels.std() > 0, "a flat image would make the comparisons meaningless"
    return pixels


def test_object_info_lists_every_node_with_its_declared_inputs_and_outputs(server):
    info = server.get("/object_info")
    for node_id in NODE_IDS:
        assert node_id in info, node_id
        assert info[node_id]["category"].startswith("memkit/")
        assert info[node_id]["description"]
    loader = info["MemKitCheckpointLoader"]
    assert loader["output"] == ["MODEL", "CLIP", "VAE"]
    assert SD15 in loader["input"]["required"]["ckpt_name"][1]["options"]
    text = info["MemKitTextEncoderLoader"]
    assert set(text["input"]["required"]) == {"clip_name1", "type"}
    assert set(text["input"]["optional"]) == {"clip_name2", "clip_name3", "device"}
    assert "sdxl" in text["input"]["required"]["type"][1]["options"]
    assert info["MemKitDiffusionModelLoader"]["input"]["required"]["weight_dtype"][1]["options"] == \
        info["UNETLoader"]["input"]["required"]["weight_dtype"][0]
    assert info["MemKitCheckpointSelector"]["input"]["required"]["cache_key"][1]["options"] == \
        ["e2e-sd15"]
    assert info["MemKitCacheStatus"]["output"] == ["BOOLEAN", "STRING"]


def test_background_preload_reports_ready_and_names_the_failed_entry(server):
    assert server.ready_statuses[-1] == 200
    status = server.get("/memkit/status")
    states = {e["cache_key"]: e["state"] for e in status["entries"]}
    assert states["e2e-sd15"] == "ready"
    assert states["e2e-sd-vae"] == "ready"
    assert states["e2e-missing"] == "failed"
    failed = next(e for e in status["entries"] if e["cache_key"] == "e2e-missing")
    assert "missing-vae.safetensors" in failed["error"]
    assert status["preload"] == {"mode": "background", "phase": "done", "state": "degraded", "ready": True,
                                 "total": 5, "done": 5, "failed": 1, "stale": 0, "warmup_error": None,
                                 "error": None}
    assert "preloading e2e-missing failed" in server.log()
    assert "model_patches_models" not in server.log()
    ready = [e for e in status["entries"] if e["state"] == "ready"]
    assert len(ready) == 4
    assert all(e["ram_bytes"] + e["vram_bytes"] > 0 for e in ready)


def test_a_prompt_hits_the_preloaded_checkpoint_without_loading(server):
    loads_before = server.get("/memkit/status")["totals"]["loads"]
    hits_before = entries(server)["e2e-sd15"]["hits"]
    outputs = server.run_prompt(sd15_image_prompt("selector"))
    assert np.isfinite(saved_pixels(server, outputs)).all()
    assert server.get("/memkit/status")["totals"]["loads"] == loads_before
    assert entries(server)["e2e-sd15"]["hits"] == hits_before + 1


@pytest.mark.slow
def test_a_lora_on_the_cached_model_never_reaches_the_next_prompt(server):
    with_lora = saved_pixels(server, server.run_prompt(sd15_image_prompt("memkit", lora=True)))
    without = saved_pixels(server, server.run_prompt(sd15_image_prompt("memkit")))
    fresh = saved_pixels(server, server.run_prompt(sd15_image_prompt("core")))
    assert np.abs(with_lora - without).max() > 10, "the LoRA must visibly change the image"
    assert np.array_equal(without, fresh), "after the LoRA prompt, the cached model gives a fresh load's image"


@pytest.mark.slow
def test_a_node_that_patches_in_place_never_changes_what_the_next_prompt_gets(server):
    """MemKitTestPatchInPlace adds weight patches and a model_options change to the very objects
    it is given. The next prompt takes the checkpoint through the selector (a node ComfyUI has not
    cached), so it gets whatever MemKit hands out now: it must be the unpatched model."""
    outputs = server.run_prompt(sd15_image_prompt("memkit", patch_in_place=True))
    patched = saved_pixels(server, outputs)
    assert ["memkit handed out: clone"] in [o["text"] for o in outputs.values() if "text" in o]
    after = saved_pixels(server, server.run_prompt(sd15_image_prompt("selector", seed=7)))
    fresh = saved_pixels(server, server.run_prompt(sd15_image_prompt("core")))
    assert np.abs(patched - fresh).max() > 10, "the in-place patch must visibly change the image"
    assert np.array_equal(after, fresh), "the next prompt must get the unpatched model"
    loads = server.get("/memkit/status")["totals"]["loads"]
    assert entries(server)["e2e-sd15"]["state"] == "ready"
    assert loads == server.get("/memkit/status")["totals"]["loads"]


def test_cache_info_node_shows_the_table(server):
    graph = GraphBuilder()
    graph.node("MemKitCacheInfo")
    graph.node("MemKitCacheStatus", name="e2e-sd15")
    outputs = server.run_prompt(graph.finalize())
    texts = {node: "".join(o["text"]) for node, o in outputs.items()}
    table = next(t for t in texts.values() if t.startswith("cache_key"))
    assert "e2e-sd15" in table
    assert "checkpoint" in table
    assert "failed" in table
    detail = next(t for t in texts.values() if not t.startswith("cache_key"))
    assert detail.startswith("e2e-sd15: checkpoint")


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/memkit/evict", None, 400, "field 'name': Field required"),
    ("/memkit/evict", {"name": 3}, 400, "field 'name'"),
    ("/memkit/evict", {"name": "../../etc/passwd"}, 400, "leaves the model folder"),
    ("/memkit/evict", {"name": "/etc/passwd"}, 400, "absolute path"),
    ("/memkit/evict", {"name": "x", "force": True}, 400, "field 'force': Extra inputs are not permitted"),
    ("/memkit/evict", {"name": "never-loaded.safetensors"}, 404, "nothing cached under"),
    ("/memkit/evict", [1, 2], 400, "must be a JSON object"),
    ("/memkit/clear", {"include_pinned": "yes"}, 400, "field 'include_pinned'"),
    ("/memkit/preload", {"cache_keys": ["nope"]}, 400, "field 'cache_keys': unknown cache key(s) 'nope'; configured:"),
    ("/memkit/preload", {"cache_keys": "e2e-sd15"}, 400, "field 'cache_keys'"),
    ("/memkit/preload", {"wait": 1}, 400, "field 'wait'"),
    ("/memkit/pin", {"name": "e2e-sd15"}, 400, "field 'pinned': Field required"),
    ("/memkit/pin", {"name": "e2e-sd15", "pinned": "no"}, 400, "field 'pinned'"),
    ("/memkit/pin", {"name": "../x", "pinned": True}, 400, "leaves the model folder"),
    ("/memkit/pin", {"name": "never-loaded.safetensors", "pinned": False}, 404, "nothing cached under"),
])
def test_routes_reject_bad_requests_with_a_named_reason(server, path, body, status, message):
    got, answer = server.request("POST", path, body if body is not None else {})
    assert got == status
    assert message in answer["error"]


def test_routes_reject_a_body_that_is_not_json(server):
    status, answer = server.request("POST", "/memkit/clear", raw=b"{nope")
    assert status == 400
    assert "not valid JSON" in answer["error"]
    assert server.get("/system_stats")  # and ComfyUI keeps serving


def released_on_the_executing_thread(server) -> None:
    """Evictions through the routes are let go by a MemKitReleaseEvicted prompt on ComfyUI's queue."""
    deadline = time.monotonic() + 60

    def releases() -> list:
        return [item for item in server.get("/history").values()
                if [n["class_type"] for n in item["prompt"][2].values()] == ["MemKitReleaseEvicted"]]

    # the node clears "releasing" before ComfyUI records its prompt in the history: wait for both
    while (any(e["state"] == "releasing" for e in server.get("/memkit/status")["entries"])
           or not releases()):
        assert time.monotonic() < deadline, "evicted models were never released"
        time.sleep(0.1)
    assert releases()
    assert all(item["status"]["status_str"] == "success" for item in releases())


def test_preload_route_reloads_an_evicted_entry(server):
    assert server.request("POST", "/memkit/evict", {"name": "memkit-sd-vae.safetensors"})[0] == 200
    # no longer served: waiting for the release prompt, or (when that prompt already ran) still
    # held by ComfyUI's output cache from an earlier prompt, or gone
    assert entries(server).get("e2e-sd-vae", {}).get("state") in (None, "releasing", "evicted-held")
    released_on_the_executing_thread(server)
    status, answer = server.request("POST", "/memkit/preload", {"cache_keys": ["e2e-sd-vae"], "wait": True})
    assert status == 200
    assert answer["ready"] is True
    assert entries(server)["e2e-sd-vae"]["state"] == "ready"


def test_comfyui_free_drops_unpinned_entries_and_keeps_pinned_ones(server):
    assert "e2e-sd-vae" in entries(server)
    status, _ = server.request("POST", "/free", {"unload_models": True})
    assert status == 200
    released_on_the_executing_thread(server)
    after = entries(server)
    assert after.get("e2e-sd-vae", {}).get("state") in (None, "evicted-held"), "unpinned entries go"
    assert after["e2e-sd15"]["state"] == "ready", "pinned entries stay"


def test_status_lists_the_configured_entries_for_the_page(server):
    configured = server.get("/memkit/status")["configured"]
    assert [(e["cache_key"], e["kind"], e["pinned"]) for e in configured] == [
        ("e2e-sd15", "checkpoint", True),
        ("text_encoder:memkit-clip-l.safetensors[type=stable_diffusion]", "text_encoder", True),
        ("diffusion_model:memkit-wan21-t2v-tiny.safetensors", "diffusion_model", True),
        ("e2e-sd-vae", "vae", False), ("e2e-missing", "vae", True)]
    assert configured[0]["files"] == [SD15]


def test_pin_route_sets_the_flag_that_clear_honours(server):
    status, answer = server.request("POST", "/memkit/pin", {"name": SD15, "pinned": False})  # by file name
    assert (status, answer) == (200, {"entries": ["e2e-sd15"], "pinned": False})
    assert entries(server)["e2e-sd15"]["pinned"] is False
    status, answer = server.request("POST", "/memkit/pin", {"name": "e2e-sd15", "pinned": True})
    assert (status, answer) == (200, {"entries": ["e2e-sd15"], "pinned": True})
    assert "e2e-sd15" not in server.request("POST", "/memkit/clear", {})[1]["evicted"], "pinned again"
    server.request("POST", "/memkit/pin", {"name": "e2e-sd15", "pinned": False})
    assert "e2e-sd15" in server.request("POST", "/memkit/clear", {})[1]["evicted"], "unpinned: cleared"
    released_on_the_executing_thread(server)
    status, _ = server.request("POST", "/memkit/preload", {"cache_keys": ["e2e-sd15"], "wait": True})
    assert status == 200
    assert (entries(server)["e2e-sd15"]["state"], entries(server)["e2e-sd15"]["pinned"]) == ("ready", True)


def test_clear_route_keeps_pinned_unless_asked(server):
    status, answer = server.request("POST", "/memkit/clear", {})
    assert status == 200
    assert "e2e-sd15" not in answer["evicted"]
    status, answer = server.request("POST", "/memkit/clear", {"include_pinned": True})
    assert "e2e-sd15" in answer["evicted"]
    assert server.get("/memkit/status")["totals"]["entries"] == 0


@pytest.mark.slow
def test_memkit_text_encode_gives_clip_text_encodes_image_and_a_repeat_skips_the_encoder(server):
    reference = saved_pixels(server, server.run_prompt(sd15_image_prompt("memkit", seed=11)))
    prompt = sd15_image_prompt("memkit", seed=11, encoder="MemKitTextEncode")
    ours = saved_pixels(server, server.run_prompt(prompt))
    assert np.array_equal(ours, reference)
    before = server.get("/memkit/status")["conditioning"]
    assert (before["misses"], before["disk_files"]) == (2, 2), "two texts, encoded once each, kept on disk too"
    # (last in this module: /free evicts what the tests above use)
    # ComfyUI's own cache answers a repeat; free it (and our RAM copies) so the node runs again
    assert server.request("POST", "/free", {"free_memory": True})[0] == 200
    wait_until(lambda: server.get("/memkit/status")["conditioning"]["ram_entries"] == 0)
    again = saved_pixels(server, server.run_prompt(prompt))
    assert np.array_equal(again, reference)
    after = server.get("/memkit/status")["conditioning"]
    assert (after["misses"], after["disk_hits"]) == (2, before["disk_hits"] + 2)


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)
