"""The cached loaders against ComfyUI's own loaders, in process, with seeded real models."""

from __future__ import annotations

import shutil
import threading

import pytest
import torch

from comfyui_memkit.model_cache.loads import Load
from comfyui_memkit.model_cache.recipe import ModelKind

SD_VAE = "memkit-sd-vae.safetensors"
WAN_VAE_TINY = "memkit-wan21-vae-tiny.safetensors"
WAN_DM = "memkit-wan21-t2v-tiny.safetensors"
CLIP_L = "memkit-clip-l.safetensors"
CLIP_G = "memkit-clip-g.safetensors"


def _nodes():
    from comfyui_memkit.nodes import cached_loaders, selectors

    return cached_loaders, selectors


def _decode(vae, channels=4):
    latent = torch.randn((1, channels, 8, 8), generator=torch.Generator().manual_seed(3))
    image = vae.decode(latent)
    assert torch.isfinite(image).all()
    return image


def _encode(clip, text="a photo of a red fox in the snow"):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    assert torch.isfinite(cond).all()
    return cond, pooled


def test_vae_loader_is_a_drop_in_for_vaeloader_and_hits_the_second_time(comfy_host, make_service):
    service = make_service()
    loaders, _ = _nodes()
    ours = loaders.MemKitVAELoader.execute(SD_VAE).result[0]
    theirs = comfy_host.nodes.VAELoader().load_vae(SD_VAE)[0]
    assert torch.equal(_decode(ours), _decode(theirs))
    again = loaders.MemKitVAELoader.execute(SD_VAE).result[0]
    assert service.cache.loads == 1
    (entry,) = service.cache.entries()
    assert entry.hits == 1
    assert entry.cache_key == f"vae:{SD_VAE}"
    assert again.patcher is not ours.patcher, "each request gets its own patcher"
    assert again.first_stage_model is ours.first_stage_model, "but shares the cached weights"
    assert entry.footprint.ram > 50 * 2**20


def test_diffusion_model_loader_matches_unetloader_and_keys_on_weight_dtype(comfy_host, make_service):
    service = make_service()
    loaders, _ = _nodes()
    ours = loaders.MemKitDiffusionModelLoader.execute(WAN_DM, "default").result[0]
    theirs = comfy_host.nodes.UNETLoader().load_unet(WAN_DM, "default")[0]
    assert type(ours.model).__name__ == type(theirs.model).__name__ == "WAN21"
    ours_sd, theirs_sd = ours.model.state_dict(), theirs.model.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    assert all(torch.equal(ours_sd[k], theirs_sd[k]) for k in ours_sd)
    fp8 = loaders.MemKitDiffusionModelLoader.execute(WAN_DM, "fp8_e4m3fn").result[0]
    assert service.cache.loads == 2, "another weight dtype is another recipe"
    assert fp8.model.diffusion_model.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn


def test_clone_isolates_patches_from_the_cached_model(comfy_host, make_service):
    service = make_service()
    loaders, _ = _nodes()
    first = loaders.MemKitDiffusionModelLoader.execute(WAN_DM, "default").result[0]
    key = next(iter(first.model.state_dict()))
    weight = first.model.state_dict()[key]
    first.add_patches({key: (torch.ones_like(weight),)}, strength_patch=0.5)
    first.model_options["transformer_options"]["marker"] = True
    second = loaders.MemKitDiffusionModelLoader.execute(WAN_DM, "default").result[0]
    assert second.patches == {}
    assert "marker" not in second.model_options.get("transformer_options", {})
    (entry,) = service.cache.entries()
    assert entry.value.parts[0].patches == {}


def test_single_text_encoder_matches_cliploader(comfy_host, make_service):
    make_service()
    loaders, _ = _nodes()
    ours = loaders.MemKitTextEncoderLoader.execute(CLIP_L, "stable_diffusion").result[0]
    theirs = comfy_host.nodes.CLIPLoader().load_clip(CLIP_L, "stable_diffusion")[0]
    assert torch.equal(_encode(ours)[0], _encode(theirs)[0])


@pytest.mark.slow
def test_dual_text_encoders_match_dualcliploader(comfy_host, make_service):
    service = make_service()
    loaders, _ = _nodes()
    ours = loaders.MemKitTextEncoderLoader.execute(CLIP_L, "sdxl", clip_name2=CLIP_G).result[0]
    theirs = comfy_host.nodes.DualCLIPLoader().load_clip(CLIP_L, CLIP_G, "sdxl")[0]
    ours_cond, ours_pooled = _encode(ours)
    theirs_cond, theirs_pooled = _encode(theirs)
    assert ours_cond.shape[-1] == 2048
    assert torch.equal(ours_cond, theirs_cond)
    assert torch.equal(ours_pooled, theirs_pooled)
    assert service.cache.entries()[0].cache_key == f"text_encoder:{CLIP_L}+{CLIP_G}[type=sdxl]"


def test_alternating_two_checkpoints_never_reloads(comfy_host, make_service):
    service = make_service()
    loaders, _ = _nodes()
    for name in ["memkit-wan-tiny-a.safetensors", "memkit-wan-tiny-b.safetensors"] * 2:
        model, clip, _vae = loaders.MemKitCheckpointLoader.execute(name).result
        assert type(model.model).__name__ == "WAN21"
        assert clip is None  # a diffusion-only checkpoint, exactly as CheckpointLoaderSimple returns it
    assert service.cache.loads == 2
    assert sorted(e.hits for e in service.cache.entries()) == [1, 1]


def test_budget_evicts_the_least_recently_used_model(comfy_host, make_service):
    from comfyui_memkit.model_cache.comfy_models import footprint

    probe = make_service()
    one = footprint(probe.request(Load.loader(ModelKind.CHECKPOINT, ["memkit-wan-tiny-a.safetensors"])).value).ram
    service = make_service(ram_budget_gb=1.5 * one / 2**30)
    a, b = "memkit-wan-tiny-a.safetensors", "memkit-wan-tiny-b.safetensors"
    service.checkout(Load.loader(ModelKind.CHECKPOINT, [a]))
    service.checkout(Load.loader(ModelKind.CHECKPOINT, [b]))
    assert [e.cache_key for e in service.cache.entries()] == [f"checkpoint:{b}"]
    assert service.cache.evictions == 1
    service.checkout(Load.loader(ModelKind.CHECKPOINT, [a]))
    assert service.cache.loads == 3
    assert service.cache.used_bytes <= service.cache.budget_bytes


def test_eight_threads_asking_for_one_model_load_it_once(comfy_host, make_service):
    service = make_service()
    results, errors = [], []

    def request():
        try:
            load = Load.loader(ModelKind.DIFFUSION_MODEL, [WAN_DM], {"weight_dtype": "default"})
            results.append(service.request(load).value)
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert len(results) == 8
    assert len({id(r) for r in results}) == 1
    assert service.cache.loads == 1


def test_a_file_changed_on_disk_is_reloaded_and_changes_the_fingerprint(comfy_host, make_service, scratch_models):
    service = make_service()
    loaders, _ = _nodes()
    target = scratch_models["vae"] / "memkit-scratch-vae.safetensors"
    shutil.copy(comfy_host.models / "vae" / SD_VAE, target)
    before_print = loaders.MemKitVAELoader.fingerprint_inputs("memkit-scratch-vae.safetensors")
    before = _decode(loaders.MemKitVAELoader.execute("memkit-scratch-vae.safetensors").result[0], channels=4)
    shutil.copy(comfy_host.models / "vae" / WAN_VAE_TINY, target)  # a different model under the same name
    after_print = loaders.MemKitVAELoader.fingerprint_inputs("memkit-scratch-vae.safetensors")
    assert before_print != after_print
    reloaded = loaders.MemKitVAELoader.execute("memkit-scratch-vae.safetensors").result[0]
    assert reloaded.latent_channels == 16
    assert before.shape[-1] == 3
    assert service.cache.loads == 2
    assert len(service.cache.entries()) == 1, "the stale copy is dropped"


def test_a_corrupt_file_gives_a_clear_error_and_leaves_the_cache_consistent(comfy_host, make_service, scratch_models):
    from comfyui_memkit.model_cache.service import ModelLoadError

    service = make_service()
    loaders, _ = _nodes()
    broken = scratch_models["vae"] / "memkit-broken.safetensors"
    broken.write_bytes(b"\x00not a safetensors file" * 10)
    with pytest.raises(ModelLoadError, match=r"memkit-broken\.safetensors"):
        loaders.MemKitVAELoader.execute("memkit-broken.safetensors")
    assert service.cache.entries() == []
    assert service.cache.loading() == []
    loaders.MemKitVAELoader.execute(SD_VAE)
    assert [e.cache_key for e in service.cache.entries()] == [f"vae:{SD_VAE}"]


def test_a_failed_load_is_not_offered_by_the_selectors(comfy_host, make_service, scratch_models):
    from comfyui_memkit.model_cache.service import ModelLoadError

    service = make_service()
    (scratch_models["vae"] / "memkit-broken.safetensors").write_bytes(b"\x00not a model" * 10)
    with pytest.raises(ModelLoadError):
        service.checkout(Load.loader(ModelKind.VAE, ["memkit-broken.safetensors"]))
    service.checkout(Load.loader(ModelKind.VAE, [SD_VAE]))
    assert list(service.cache_keys.known(ModelKind.VAE)) == [f"vae:{SD_VAE}"]


def test_a_missing_name_names_the_folder(comfy_host, make_service):
    from comfyui_memkit.model_cache.service import ModelNotFoundError

    service = make_service()
    with pytest.raises(ModelNotFoundError, match=r"'nope\.safetensors' is not a file in ComfyUI's 'vae'"):
        service.checkout(Load.loader(ModelKind.VAE, ["nope.safetensors"]))
    with pytest.raises(ModelNotFoundError, match="checkpoints"):
        service.checkout(Load.loader(ModelKind.CHECKPOINT, ["../vae/" + SD_VAE]))


def test_a_selector_with_an_unknown_key_lists_the_keys_that_exist(comfy_host, make_service):
    from comfyui_memkit.model_cache.config import VAEEntry

    make_service(entries=[VAEEntry(vae_name=SD_VAE, cache_key="my-vae")])
    _, selectors = _nodes()
    with pytest.raises(ValueError, match=r"^There is no vae with cache key 'other'\. Cache keys that exist: my-vae\.$"):
        selectors.MemKitVAESelector.execute("other")
    vae = selectors.MemKitVAESelector.execute("my-vae").result[0]
    assert torch.isfinite(_decode(vae)).all()


SD15 = "memkit-sd15.safetensors"
KIND_CASES = {
    "checkpoint": (ModelKind.CHECKPOINT, [SD15], {}),
    "one text encoder": (ModelKind.TEXT_ENCODER, [CLIP_L], {"type": "stable_diffusion", "device": "default"}),
    "one text encoder on cpu": (ModelKind.TEXT_ENCODER, [CLIP_L], {"type": "stable_diffusion", "device": "cpu"}),
    "two text encoders": (ModelKind.TEXT_ENCODER, [CLIP_L, CLIP_G], {"type": "sdxl", "device": "default"}),
    "diffusion model": (ModelKind.DIFFUSION_MODEL, [WAN_DM], {"weight_dtype": "default"}),
    "diffusion model fp8": (ModelKind.DIFFUSION_MODEL, [WAN_DM], {"weight_dtype": "fp8_e4m3fn"}),
    "vae": (ModelKind.VAE, [SD_VAE], {}),
}
SLOW_CASES = {"checkpoint", "two text encoders"}


def _loaded_patchers():
    import comfy.model_management

    return [m.model for m in comfy.model_management.current_loaded_models if m.model is not None]


@pytest.mark.parametrize("auto_gpu_load", [True, False], ids=["auto_gpu_load", "no_gpu_load"])
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c
                                  for c in KIND_CASES])
def test_every_kind_loads_under_each_auto_gpu_load_setting(comfy_host, make_service, case, auto_gpu_load):
    """Through the cache's executing-thread path: the place every preload, loader and selector ends."""
    import comfy.model_management

    from comfyui_memkit.model_cache.comfy_models import patchers

    kind, names, options = KIND_CASES[case]
    service = make_service(auto_gpu_load=auto_gpu_load)
    comfy.model_management.unload_all_models()
    parts = service.checkout(Load.loader(kind, names, options))
    (entry,) = service.cache.entries()
    cached_patchers = patchers(entry.value)
    assert len(cached_patchers) == len([p for p in entry.value.parts if p is not None])
    loaded = _loaded_patchers()
    for patcher in cached_patchers:
        if auto_gpu_load:
            assert patcher in loaded
        elif not getattr(patcher, "is_clip", False):  # ComfyUI's CLIP() loads itself when built on CPU
            assert patcher not in loaded
    for ours, cached in zip(parts, entry.value.parts):
        assert (ours is None) == (cached is None)
        if ours is not None:
            assert ours is not cached, "a clone is handed out, never the cached object"
    again = service.checkout(Load.loader(kind, names, options))
    assert service.cache.loads == 1
    assert all(a is not b for a, b in zip(again, parts) if a is not None)


def test_auto_gpu_load_never_places_a_model_off_the_executing_thread(comfy_host, make_service):
    """A load outside ComfyUI's prompt worker (a blocking preload at start-up) only fills RAM."""
    import comfy.model_management

    service = make_service(auto_gpu_load=True)
    comfy.model_management.unload_all_models()
    outcome = service.request(Load.loader(ModelKind.VAE, [SD_VAE]), executing_thread=False)
    assert outcome.value.parts[0].patcher not in _loaded_patchers()


def test_preload_entries_place_blocking_loads_once_comfyui_runs(comfy_host, make_service):
    import comfy.model_management

    from comfyui_memkit.model_cache.config import DiffusionModelEntry, VAEEntry

    entries = [VAEEntry(vae_name=SD_VAE, cache_key="vae"),
               DiffusionModelEntry(model_name=WAN_DM, cache_key="dm"),
               VAEEntry(vae_name="missing.safetensors", cache_key="missing")]
    service = make_service(entries=entries, auto_gpu_load=True)
    comfy.model_management.unload_all_models()
    assert set(service.preload_entries(entries, executing_thread=False)) == {"missing"}
    assert _loaded_patchers() == []
    seen = []
    failures = service.preload_entries(entries, executing_thread=True, on_entry=lambda a, e: seen.append(a))
    assert set(failures) == {"missing"}
    assert "is not a file in ComfyUI's 'vae' model folders" in failures["missing"]
    assert seen == ["vae", "dm", "missing"]
    assert service.cache.loads == 2
    assert len(_loaded_patchers()) == 2


def _sample(comfy_host, model):
    """One step of ComfyUI's own sampler on a tiny Wan latent (cfg 1: the positive prompt only)."""
    context = torch.randn((1, 8, 4096), generator=torch.Generator().manual_seed(11))
    latent = {"samples": torch.zeros((1, 16, 1, 8, 8))}
    out = comfy_host.nodes.common_ksampler(model, 3, 1, 1.0, "euler", "simple", [[context, {}]], [[context, {}]],
                                           latent)[0]["samples"]
    assert torch.isfinite(out).all()
    return out


def _attention_ops(comfy_host, model):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out = _sample(comfy_host, model)
    return out, {event.key for event in profile.key_averages()}


def test_attention_mode_patches_the_clone_only_and_is_used_when_sampling(comfy_host, make_service, caplog):
    from comfyui_memkit.model_cache.comfy_models import OVERRIDE_KEY

    service = make_service()
    loaders, _ = _nodes()
    default = loaders.MemKitDiffusionModelLoader.execute(WAN_DM, "default").result[0]
    sdpa = loaders.MemKitDiffusionModelLoader.execute(WAN_DM, "default", attention_mode="sdpa").result[0]
    assert service.cache.loads == 1, "attention modes share the cached weights"
    assert OVERRIDE_KEY in sdpa.model_options["transformer_options"]
    cached = service.cache.entries()[0].value.parts[0]
    assert OVERRIDE_KEY not in cached.model_options.get("transformer_options", {})
    assert OVERRIDE_KEY not in default.model_options.get("transformer_options", {})
    default_out, default_ops = _attention_ops(comfy_host, default)
    sdpa_out, sdpa_ops = _attention_ops(comfy_host, sdpa)
    assert "aten::scaled_dot_product_attention" in sdpa_ops
    assert "aten::scaled_dot_product_attention" not in default_ops, "ComfyUI's CPU default is another backend"
    assert torch.allclose(sdpa_out, default_out, atol=1e-3, rtol=1e-3)
    assert (loaders.MemKitDiffusionModelLoader.fingerprint_inputs(WAN_DM, "default", "sdpa")
            != loaders.MemKitDiffusionModelLoader.fingerprint_inputs(WAN_DM, "default"))


def test_sage_attention_where_it_is_unavailable_warns_once_and_uses_the_default(comfy_host, make_service, caplog):
    import comfy.ldm.modules.attention as attention

    if attention.SAGE_ATTENTION_IS_AVAILABLE and torch.cuda.is_available():
        pytest.skip("SageAttention is available here")
    make_service()
    loaders, _ = _nodes()
    loaders._warned.clear()  # a fresh process's state
    default = loaders.MemKitDiffusionModelLoader.execute(WAN_DM, "default").result[0]
    with caplog.at_level("WARNING", logger="memkit"):
        sage = loaders.MemKitDiffusionModelLoader.execute(WAN_DM, "default", attention_mode="sage").result[0]
        loaders.MemKitDiffusionModelLoader.execute(WAN_DM, "default", attention_mode="sage")
    warnings = [r.getMessage() for r in caplog.records if "attention_mode 'sage'" in r.getMessage()]
    assert len(warnings) == 1, "one line, not one per prompt"
    assert "not available (the sageattention package is not installed" in warnings[0] or "CUDA" in warnings[0]
    assert "using ComfyUI's default attention" in warnings[0]
    assert torch.equal(_sample(comfy_host, sage), _sample(comfy_host, default))
