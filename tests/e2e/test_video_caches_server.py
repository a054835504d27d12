"""Video-workflow caches through a real server: any loader preloaded from the config's ``nodes``
section (a third-party V1 loader from a test node pack, CLIP vision) and handed out by
MemKitCachedNode, a loader called by node id, MemKitTextEncodeByName, the shipped Wan 2.1
text-to-video workflow with tiny stand-ins for its models, and that workflow with MemKitStepCache
(its report in /memkit/status, on the page's websocket and as the node's text)."""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from comfy_execution.graph_utils import GraphBuilder
from PIL import Image

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SD15 = "memkit-sd15.safetensors"
CLIP_L = "memkit-clip-l.safetensors"
UPSCALER = "memkit-esrgan-compact-x2.safetensors"
CONFIG = {
    "nodes": [
        {"node": "MemKitTestThirdPartyLoader", "cache_key": "test-loader",
         "inputs": {"model_name": "memkit-test-loader.safetensors", "scale": 2.0, "mode": "exact"}},
        {"node": "CLIPVisionLoader", "cache_key": "vision",
         "inputs": {"clip_name": "memkit-clip-vision-vitl.safetensors"}},
        {"node": "MemKitTestThirdPartyLoader", "cache_key": "bad-scale",
         "inputs": {"model_name": "memkit-test-loader.safetensors", "scale": 11, "mode": "exact"}},
    ],
}
# The shipped Wan workflow names the real files; these seeded test models play their roles.
WAN_STAND_INS = {
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": "memkit-umt5-standin.safetensors",  # never loaded: see below
    "wan2.1_t2v_1.3B_fp16.safetensors": "memkit-wan21-t2v-tiny.safetensors",
    "wan_2.1_vae.safetensors": "memkit-wan21-vae-tiny.safetensors",
}


@pytest.fixture(scope="module")
def server(start_server):
    server = start_server(CONFIG, preload_mode="background")
    server.wait_ready()
    return server


def entries(server) -> dict[str, dict]:
    return {e["cache_key"]: e for e in server.get("/memkit/status")["entries"]}


def loads(server) -> int:
    return server.get("/memkit/status")["totals"]["loads"]


def test_node_entries_preload_and_a_bad_one_fails_alone_naming_its_field(server):
    found = entries(server)
    assert found["test-loader"]["state"] == "ready"
    assert found["test-loader"]["kind"] == "node"
    assert found["test-loader"]["uncloned"] == ["MemKitTestModel"], "an object without clone() is handed out uncloned"
    assert found["test-loader"]["ram_bytes"] == 64 * 64 * 4, "its own tensors are measured (a 64x64 fp32 weight)"
    assert found["vision"]["state"] == "ready"
    assert found["vision"]["uncloned"] == []
    assert found["bad-scale"]["state"] == "failed"
    assert found["bad-scale"]["error"] == ("MemKitTestThirdPartyLoader: field 'inputs.scale': 11 is above the "
                                           "maximum 10.0")
    assert "preloading bad-scale failed: MemKitTestThirdPartyLoader: field 'inputs.scale'" in server.log(whole=True)
    assert server.get("/memkit/ready")["state"] == "degraded"
    assert server.problems() == []


def test_object_info_offers_the_node_entries_and_typed_any_outputs(server):
    info = server.get("/object_info")["MemKitCachedNode"]
    assert info["input"]["required"]["cache_key"][1]["options"] == ["test-loader", "vision", "bad-scale"]
    assert info["output"] == ["*"] * 4


def test_the_cached_node_hands_out_the_preloaded_third_party_object(server):
    before = loads(server)
    graph = GraphBuilder()
    cached = graph.node("MemKitCachedNode", cache_key="test-loader")
    graph.node("MemKitTestUseModel", test_model=cached.out(0))
    graph.node("PreviewAny", source=cached.out(1))
    outputs = server.run_prompt(graph.finalize())
    texts = [t for o in outputs.values() for t in o.get("text", [])]
    used = next(t for t in texts if t.startswith("sum="))
    assert "load=1 mode=exact" in used, "the object the preload built, not a new load"
    assert "scale=2.0 mode=exact load=1" in " ".join(texts), "the loader's second output, in order"
    assert loads(server) == before


def test_a_star_output_feeds_a_typed_input(server):
    graph = GraphBuilder()
    vision = graph.node("MemKitCachedNode", cache_key="vision")
    image = graph.node("EmptyImage", width=224, height=224, batch_size=1, color=0x336699)
    encoded = graph.node("CLIPVisionEncode", clip_vision=vision.out(0), image=image.out(0), crop="center")
    graph.node("PreviewAny", source=encoded.out(0))
    server.run_prompt(graph.finalize())
    assert entries(server)["vision"]["hits"] >= 1


def upscale_prompt(size: int) -> dict:
    graph = GraphBuilder()
    loader = graph.node("MemKitCachedNode", cache_key="vision", node_id="UpscaleModelLoader",
                        inputs_json=json.dumps({"model_name": UPSCALER}))
    image = graph.node("EmptyImage", width=size, height=size, batch_size=1, color=0x884422)
    upscaled = graph.node("ImageUpscaleWithModel", upscale_model=loader.out(0), image=image.out(0))
    graph.node("SaveImage", images=upscaled.out(0), filename_prefix=f"e2e_upscale_{size}")
    return graph.finalize()


def test_a_loader_called_by_node_id_loads_on_first_use_and_is_cached(server):
    before = loads(server)
    outputs = server.run_prompt(upscale_prompt(32))
    (image,) = [i for o in outputs.values() for i in o.get("images", [])]
    assert Image.open(server.output_file(image)).size == (64, 64)
    key = f"node:UpscaleModelLoader(model_name={UPSCALER})"
    assert entries(server)[key]["state"] == "ready"
    assert entries(server)[key]["pinned"] is False, "loaded on demand: unpinned"
    assert loads(server) == before + 1
    server.run_prompt(upscale_prompt(48))
    assert loads(server) == before + 1


def sd15_prompt(by_name: bool, text: str = "a lighthouse at dusk") -> dict:
    graph = GraphBuilder()
    ckpt = graph.node("MemKitCheckpointLoader", ckpt_name=SD15)
    if by_name:
        positive = graph.node("MemKitTextEncodeByName", clip_name1=CLIP_L, type="stable_diffusion", text=text)
        negative = graph.node("MemKitTextEncodeByName", clip_name1=CLIP_L, type="stable_diffusion", text="")
    else:
        clip = graph.node("CLIPLoader", clip_name=CLIP_L, type="stable_diffusion")
        positive = graph.node("CLIPTextEncode", clip=clip.out(0), text=text)
        negative = graph.node("CLIPTextEncode", clip=clip.out(0), text="")
    latent = graph.node("EmptyLatentImage", width=64, height=64, batch_size=1)
    sampled = graph.node("KSampler", model=ckpt.out(0), positive=positive.out(0), negative=negative.out(0),
                         latent_image=latent.out(0), seed=5, steps=2, cfg=5.0, sampler_name="euler",
                         scheduler="normal", denoise=1.0)
    decoded = graph.node("VAEDecode", samples=sampled.out(0), vae=ckpt.out(2))
    graph.node("SaveImage", images=decoded.out(0), filename_prefix=f"e2e_by_name_{int(by_name)}")
    return graph.finalize()


def saved(server, outputs: dict) -> np.ndarray:
    (image,) = [i for o in outputs.values() for i in o.get("images", [])]
    pixels = np.asarray(Image.open(server.output_file(image)), dtype=np.int16)
    assert pixels.std() > 0
    return pixels


def text_encoders_loaded(server) -> list[str]:
    return [e["cache_key"] for e in server.get("/memkit/status")["entries"]
            if e.get("kind") == "text_encoder" and e["state"] == "ready"]


def test_text_encode_by_name_gives_clip_text_encodes_image_and_skips_the_encoder_on_a_hit(server):
    reference = saved(server, server.run_prompt(sd15_prompt(by_name=False)))
    ours = saved(server, server.run_prompt(sd15_prompt(by_name=True)))
    assert np.array_equal(ours, reference)
    assert text_encoders_loaded(server) == [f"text_encoder:{CLIP_L}[type=stable_diffusion]"]
    # /free drops ComfyUI's output cache, MemKit's unpinned models and its RAM conditionings
    assert server.request("POST", "/free", {"unload_models": True, "free_memory": True})[0] == 200
    server.run_prompt({"1": {"class_type": "MemKitReleaseEvicted", "inputs": {}}})
    before = server.get("/memkit/status")
    assert text_encoders_loaded(server) == []
    again = saved(server, server.run_prompt(sd15_prompt(by_name=True)))
    after = server.get("/memkit/status")
    assert np.array_equal(again, reference)
    assert text_encoders_loaded(server) == [], "the text encoder was never loaded again"
    assert after["conditioning"]["disk_hits"] >= before["conditioning"]["disk_hits"] + 2
    assert server.problems() == []


def wan_workflow_for_tests() -> dict:
    """The shipped workflow (API export) with its files mapped to the stand-ins and shrunk to CPU size."""
    text = (REPO / "workflows" / "api" / "memkit_wan21_t2v.json").read_text()
    for real, stand_in in WAN_STAND_INS.items():
        text = text.replace(json.dumps(real), json.dumps(stand_in))
    workflow = json.loads(text)
    workflow["5"]["inputs"].update(width=128, height=96, length=5)
    workflow["6"]["inputs"]["steps"] = 2
    return workflow


def remember_wan_conditionings(server, workflow: dict) -> None:
    """Put the workflow's two prompts' conditionings in MemKit's cache, as an earlier run would have."""
    for index, node in enumerate(("3", "4")):
        inputs = workflow[node]["inputs"]
        server.run_prompt({"1": {"class_type": "MemKitTestRememberConditioning",
                                 "inputs": {"clip_name": inputs["clip_name1"], "type": inputs["type"],
                                            "text": inputs["text"], "seed": index, "tokens": 16, "width": 4096}}})


def test_the_shipped_wan_workflow_runs_and_never_loads_its_text_encoder(server):
    """umt5-xxl (5.7 B parameters) does not fit a test; as after an earlier run that encoded these
    prompts, their conditionings are in MemKit's cache, so the workflow must run without it (the
    stand-in file is no text encoder: a load would fail the prompt)."""
    workflow = wan_workflow_for_tests()
    remember_wan_conditionings(server, workflow)
    hits_before = server.get("/memkit/status")["conditioning"]
    outputs = server.run_prompt(workflow)
    (animation,) = [i for o in outputs.values() for i in o.get("images", [])]
    webp = Image.open(server.output_file(animation))
    assert (webp.size, webp.n_frames) == ((128, 96), 5)
    frames = []
    for index in range(webp.n_frames):
        webp.seek(index)
        frames.append(np.asarray(webp.convert("RGB"), dtype=np.float32))
    assert np.isfinite(frames).all()
    assert np.std(frames) > 0
    status = server.get("/memkit/status")
    hits = status["conditioning"]["ram_hits"] + status["conditioning"]["disk_hits"]
    assert hits == hits_before["ram_hits"] + hits_before["disk_hits"] + 2
    assert not any("umt5" in f for e in status["entries"] for f in e.get("files", []))
    kinds = {e["cache_key"]: e["kind"] for e in status["entries"] if e["state"] == "ready"}
    assert kinds["diffusion_model:memkit-wan21-t2v-tiny.safetensors"] == "diffusion_model"
    assert server.problems() == []


TEXT_EVENT = 3  # ComfyUI's BinaryEventTypes.TEXT: a node's progress text


@dataclass
class PageMessages:
    """What a page connected to ComfyUI's websocket (with the prompts' client id) received."""

    json: list[dict[str, Any]] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)  # (node id, text)

    def add_binary(self, data: bytes) -> None:
        (event,) = struct.unpack(">I", data[:4])
        if event == TEXT_EVENT:
            (length,) = struct.unpack(">I", data[4:8])
            self.texts.append((data[8:8 + length].decode(), data[8 + length:].decode()))


def run_prompt_watching(server, prompt: dict, until: Callable[[PageMessages], object], seconds_after: float = 10.0
                        ) -> tuple[dict, PageMessages]:
    """Run ``prompt`` while a page listens on /ws; after it ends, listen until ``until(messages)``
    holds or ``seconds_after`` pass. The prompt's outputs and everything the page received."""
    import aiohttp

    messages = PageMessages()

    async def watch() -> dict:
        url = f"{server.url.replace('http', 'ws', 1)}/ws?clientId={server.client_id}"
        async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as socket:
            prompt_done = asyncio.get_running_loop().run_in_executor(None, server.run_prompt, prompt)
            deadline = None
            while deadline is None or (time.monotonic() < deadline and not until(messages)):
                if deadline is None and prompt_done.done():
                    deadline = time.monotonic() + seconds_after
                try:
                    message = await asyncio.wait_for(socket.receive(), 0.25)
                except asyncio.TimeoutError:
                    continue
                if message.type == aiohttp.WSMsgType.TEXT:
                    messages.json.append(json.loads(message.data))
                elif message.type == aiohttp.WSMsgType.BINARY:
                    messages.add_binary(message.data)
                else:
                    break
            return await prompt_done

    return asyncio.run(watch()), messages


def step_cached_wan_workflow(steps: int) -> dict:
    """The shipped Wan workflow, whose MemKitStepCache (node 11) sits between the cached model and
    KSampler, with a huge threshold: every step in the window after the first two is skipped."""
    workflow = wan_workflow_for_tests()
    assert workflow["11"]["class_type"] == "MemKitStepCache"
    assert workflow["6"]["inputs"]["model"] == ["11", 0]
    workflow["11"]["inputs"]["threshold"] = 100.0
    workflow["6"]["inputs"]["steps"] = steps
    workflow["9"]["inputs"]["filename_prefix"] = "e2e_wan_step_cache"
    return workflow


def test_a_step_cached_wan_run_is_reported_in_status_to_the_page_and_on_the_node(server):
    steps = 8
    workflow = step_cached_wan_workflow(steps)
    remember_wan_conditionings(server, workflow)

    def pushed_run(messages: PageMessages) -> list[dict]:
        return [run for m in messages.json if m.get("type") == "memkit.status"
                for run in m["data"].get("step_cache", {}).get("runs", [])[-1:] if run["state"] == "done"]

    outputs, messages = run_prompt_watching(server, workflow, until=lambda m: pushed_run(m) and m.texts)
    assert [i for o in outputs.values() for i in o.get("images", [])], "the workflow ran to its WEBP"
    section = server.get("/memkit/status")["step_cache"]
    run = section["runs"][-1]
    assert (run["state"], run["model"], run["level"]) == ("done", "WAN21", "diffusion_model")
    assert run["steps_total"] == steps
    assert 0 < run["steps_skipped"] < steps
    assert run["conds"]["cond"] == run["conds"]["uncond"], "cond and uncond skip together"
    assert run["conds"]["cond"]["skipped"] == run["steps_skipped"]
    assert run["estimated_speedup"] == round(steps / (steps - run["steps_skipped"]), 2)
    assert sum(use["peak_bytes"] for use in run["devices"].values()) > 0, "it held diffs during the run"
    assert [use["bytes"] for use in run["devices"].values()] == [0, 0], "and none after it"
    assert (section["running"], section["held_bytes"], section["held_total_bytes"]) == (0, {}, 0)
    assert "error" not in section
    assert 0 < len(section["runs"]) <= 8

    assert [r["run"] for r in pushed_run(messages)][-1:] == [run["run"]], "the finished run reached the page"
    texts = [text for node, text in messages.texts if node == "11"]
    assert texts, f"the node's text after the run: {messages.texts}"
    assert texts[-1].startswith(f"run {run['run']} (done): skipped {run['steps_skipped']} of {steps} steps")
    assert "0 KB now" in texts[-1]
    kinds = {e["cache_key"]: e["kind"] for e in server.get("/memkit/status")["entries"] if e["state"] == "ready"}
    assert kinds["diffusion_model:memkit-wan21-t2v-tiny.safetensors"] == "diffusion_model"
    assert server.problems() == []
