"""Any loader node through the cache: ComfyUI's CLIPVisionLoader, AudioEncoderLoader and
UpscaleModelLoader with seeded real-architecture files, in process, against the core nodes."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from comfyui_memkit.model_cache.config import NodeEntry
from comfyui_memkit.model_cache.loads import Load
from comfyui_memkit.model_cache.status import build_status

CLIP_VISION = "memkit-clip-vision-vitl.safetensors"
WAV2VEC2 = "memkit-wav2vec2-base.safetensors"
UPSCALER = "memkit-esrgan-compact-x2.safetensors"


@pytest.fixture(scope="module")
def extra_nodes(comfy_host):
    """ComfyUI's comfy_extras nodes (UpscaleModelLoader, AudioEncoderLoader), as its start-up loads them."""
    import asyncio

    if "AudioEncoderLoader" not in comfy_host.nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(comfy_host.nodes.init_builtin_extra_nodes())
    assert "AudioEncoderLoader" in comfy_host.nodes.NODE_CLASS_MAPPINGS, "torchaudio missing from the host env?"
    return comfy_host.nodes.NODE_CLASS_MAPPINGS


def cached(service, node, **inputs):
    return service.checkout(Load.node(node, inputs))


def core(mappings, node, **inputs):
    cls = mappings[node]
    if hasattr(cls, "define_schema"):
        return tuple(cls.execute(**inputs).result)
    return getattr(cls(), cls.FUNCTION)(**inputs)


def image(seed=5, size=224):
    return torch.rand((1, size, size, 3), generator=torch.Generator().manual_seed(seed))


def test_clip_vision_is_cached_cloned_and_encodes_like_the_core_loader(comfy_host, extra_nodes, make_service):
    service = make_service()
    ours, = cached(service, "CLIPVisionLoader", clip_name=CLIP_VISION)
    again, = cached(service, "CLIPVisionLoader", clip_name=CLIP_VISION)
    theirs, = core(extra_nodes, "CLIPVisionLoader", clip_name=CLIP_VISION)
    assert service.cache.loads == 1
    (entry,) = service.cache.entries()
    assert entry.cache_key == f"node:CLIPVisionLoader(clip_name={CLIP_VISION})"
    assert entry.hits == 1, "the second request is a hit"
    assert ours is not again, "each request gets its own copy"
    assert ours.patcher is not again.patcher
    assert ours.model is again.model, "which shares the cached weights"
    assert entry.footprint.ram > 500 * 2**20
    encode = core(extra_nodes, "CLIPVisionEncode", clip_vision=ours, image=image(), crop="center")[0]
    reference = core(extra_nodes, "CLIPVisionEncode", clip_vision=theirs, image=image(), crop="center")[0]
    assert torch.isfinite(encode["image_embeds"]).all()
    assert torch.equal(encode["image_embeds"], reference["image_embeds"])
    assert torch.equal(encode["penultimate_hidden_states"], reference["penultimate_hidden_states"])
    status = build_status(service)["entries"][0]
    assert status["kind"] == "node"
    assert status["uncloned"] == []
    assert status["files"][0].endswith(CLIP_VISION)


def test_audio_encoder_is_cached_and_encodes_like_the_core_loader(comfy_host, extra_nodes, make_service):
    service = make_service()
    ours, = cached(service, "AudioEncoderLoader", audio_encoder_name=WAV2VEC2)
    cached(service, "AudioEncoderLoader", audio_encoder_name=WAV2VEC2)
    theirs, = core(extra_nodes, "AudioEncoderLoader", audio_encoder_name=WAV2VEC2)
    assert service.cache.loads == 1
    assert type(ours).__name__ == "AudioEncoderModel"
    waveform = torch.randn((1, 1, 16000), generator=torch.Generator().manual_seed(7)) * 0.1
    audio = {"waveform": waveform, "sample_rate": 16000}
    encoded = core(extra_nodes, "AudioEncoderEncode", audio_encoder=ours, audio=audio)[0]
    reference = core(extra_nodes, "AudioEncoderEncode", audio_encoder=theirs, audio=audio)[0]
    assert torch.isfinite(encoded["encoded_audio"]).all()
    assert torch.equal(encoded["encoded_audio"], reference["encoded_audio"])


def test_an_upscale_model_cannot_be_cloned_so_it_is_shared_and_status_says_so(comfy_host, extra_nodes, make_service):
    service = make_service()
    ours, = cached(service, "UpscaleModelLoader", model_name=UPSCALER)
    again, = cached(service, "UpscaleModelLoader", model_name=UPSCALER)
    assert ours is again
    assert build_status(service)["entries"][0]["uncloned"] == ["ImageModelDescriptor"]
    theirs, = core(extra_nodes, "UpscaleModelLoader", model_name=UPSCALER)
    pixels = image(size=32)
    upscaled = core(extra_nodes, "ImageUpscaleWithModel", upscale_model=ours, image=pixels)[0]
    assert upscaled.shape == (1, 64, 64, 3)
    assert torch.equal(upscaled, core(extra_nodes, "ImageUpscaleWithModel", upscale_model=theirs, image=pixels)[0])


def test_the_key_follows_the_node_its_inputs_and_its_files(comfy_host, extra_nodes, make_service, scratch_models,
                                                           tmp_path):
    comfy_host.folder_paths.add_model_folder_path("upscale_models", str(tmp_path))
    own = tmp_path / "memkit-scratch-x2.safetensors"
    shutil.copy(comfy_host.models / "upscale_models" / UPSCALER, own)
    service = make_service()
    load = Load.node("UpscaleModelLoader", {"model_name": own.name})
    first = service.recipe(load)
    assert first.paths == (str(own.resolve()),), "the model file is found among the inputs"
    os.utime(own, ns=(own.stat().st_atime_ns, own.stat().st_mtime_ns + 10**9))
    assert service.recipe(load).key != first.key
    other = service.recipe(Load.node("UpscaleModelLoader", {"model_name": UPSCALER}))
    assert other.key != first.key


def test_left_out_inputs_take_the_nodes_defaults_and_share_the_entry(comfy_host, make_service):
    service = make_service()
    with_default = service.recipe(Load.node("EmptyLatentImage", {"width": 512}))
    spelled_out = service.recipe(Load.node("EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}))
    assert with_default.key == spelled_out.key


@pytest.mark.parametrize(("node", "inputs", "expected"), [
    ("NoSuchLoader", {}, "NoSuchLoader: ComfyUI has no node 'NoSuchLoader' (not in this ComfyUI version, or the "
                         "node pack that provides it is not installed or failed to load)"),
    ("CLIPVisionLoader", {"clip_name": "missing.safetensors"},
     f"CLIPVisionLoader: field 'inputs.clip_name': 'missing.safetensors' is not one of: {CLIP_VISION}"),
    ("UpscaleModelLoader", {"model_name": UPSCALER, "scale": 2},
     "UpscaleModelLoader: field 'inputs.scale': UpscaleModelLoader has no input 'scale' (its inputs: model_name)"),
    ("EmptyLatentImage", {"width": 1}, "EmptyLatentImage: field 'inputs.width': 1 is below the minimum 16"),
])
def test_a_bad_node_entry_fails_alone_naming_the_field_and_the_cache_stays_consistent(
        comfy_host, extra_nodes, make_service, node, inputs, expected):
    bad = NodeEntry(node=node, inputs=inputs, cache_key="bad")
    good = NodeEntry(node="UpscaleModelLoader", inputs={"model_name": UPSCALER}, cache_key="up")
    service = make_service([bad, good])
    failures = service.preload_entries([bad, good], executing_thread=True)
    assert failures == {"bad": expected}
    assert [e.cache_key for e in service.cache.entries()] == ["up"]
    assert service.cache.loading() == []
    assert cached(service, "UpscaleModelLoader", model_name=UPSCALER)[0] is not None


def test_a_node_entry_is_offered_by_its_cache_key(comfy_host, extra_nodes, make_service):
    from comfyui_memkit.nodes.cached_node import MemKitCachedNode

    entry = NodeEntry(node="CLIPVisionLoader", inputs={"clip_name": CLIP_VISION}, cache_key="vision")
    service = make_service([entry])
    assert MemKitCachedNode.GET_SCHEMA().inputs[0].options == ["vision"]
    outputs = MemKitCachedNode.execute("vision").result
    assert type(outputs[0]).__name__ == "ClipVisionModel"
    assert outputs[1:] == (None, None, None)
    assert service.cache.entries()[0].pinned, "config entries are pinned"
    by_id = MemKitCachedNode.execute("vision", node_id="CLIPVisionLoader",
                                     inputs_json=f'{{"clip_name": "{CLIP_VISION}"}}').result
    assert service.cache.loads == 1, "the same load by node id is the same entry"
    assert by_id[0] is not outputs[0]
    with pytest.raises(ValueError, match="inputs_json is not valid JSON"):
        MemKitCachedNode.execute("vision", node_id="CLIPVisionLoader", inputs_json="{clip_name:")
