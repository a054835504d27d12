"""MemKitTextEncode against ComfyUI's CLIPTextEncode, with real (seeded) text encoders."""

from __future__ import annotations

import pytest
import torch

from comfyui_memkit.model_cache.loads import Load
from comfyui_memkit.model_cache.recipe import ModelKind

CLIP_L = "memkit-clip-l.safetensors"
TEXT = "a red fox in the snow, golden hour"


@pytest.fixture
def user_dir(comfy_host, tmp_path):
    before = comfy_host.folder_paths.get_user_directory()
    comfy_host.folder_paths.set_user_directory(str(tmp_path))
    yield tmp_path
    comfy_host.folder_paths.set_user_directory(before)


def encode(clip, text=TEXT):
    from comfyui_memkit.nodes.conditioning import MemKitTextEncode

    return MemKitTextEncode.execute(clip, text).result[0]


def reference(comfy_host, clip, text=TEXT):
    return comfy_host.nodes.CLIPTextEncode().encode(clip, text)[0]


def assert_same(ours, theirs):
    assert len(ours) == len(theirs)
    for (cond_a, extras_a), (cond_b, extras_b) in zip(ours, theirs):
        assert torch.equal(cond_a, cond_b)
        assert extras_a.keys() == extras_b.keys()
        for name in extras_a:
            if isinstance(extras_a[name], torch.Tensor):
                assert torch.equal(extras_a[name], extras_b[name])
            else:
                assert extras_a[name] == extras_b[name]


def memkit_clip(service):
    return service.checkout(Load.loader(ModelKind.TEXT_ENCODER, [CLIP_L],
                                        {"type": "stable_diffusion", "device": "default"}))[0]


def test_the_output_is_clip_text_encode_bit_for_bit_and_a_repeat_is_a_ram_hit(comfy_host, make_service, user_dir):
    service = make_service()
    clip = memkit_clip(service)
    first = encode(clip)
    assert_same(first, reference(comfy_host, clip))
    assert_same(encode(memkit_clip(service)), first)
    report = service.conditioning.report()
    assert (report["misses"], report["ram_hits"]) == (1, 1)


def test_a_memkit_encoder_is_cached_on_disk_and_hit_after_a_restart(comfy_host, make_service, user_dir):
    first = encode(memkit_clip(make_service()))
    files = list((user_dir / "memkit" / "conditioning").glob("*.safetensors"))
    assert len(files) == 1
    service = make_service()  # a restart: new RAM cache, same user directory
    again = encode(memkit_clip(service))
    assert_same(again, first)
    assert service.conditioning.report()["disk_hits"] == 1


@pytest.mark.parametrize("source", ["memkit", "comfyui"])
def test_encoder_variants_never_get_each_others_embeddings(comfy_host, make_service, user_dir, source):
    """The same weights with another clip layer (CLIPSetLastLayer) are another encoder."""
    service = make_service()
    plain = (memkit_clip(service) if source == "memkit"
             else comfy_host.nodes.CLIPLoader().load_clip(CLIP_L, "stable_diffusion")[0])
    (last_layer,) = comfy_host.nodes.CLIPSetLastLayer().set_last_layer(plain, -2)
    assert last_layer.cond_stage_model is plain.cond_stage_model, "same weights: only the layer differs"
    plain_out, layer_out = encode(plain), encode(last_layer)
    assert not torch.equal(plain_out[0][0], layer_out[0][0])
    assert_same(layer_out, reference(comfy_host, last_layer))
    assert_same(encode(plain), reference(comfy_host, plain))
    assert service.conditioning.report()["misses"] == 2
    disk = len(list((user_dir / "memkit" / "conditioning").glob("*.safetensors")))
    assert disk == (2 if source == "memkit" else 0), "a MemKit encoder stays stable through ComfyUI's clone"


def test_a_patched_encoder_is_always_encoded_anew(comfy_host, make_service, user_dir):
    service = make_service()
    patched = memkit_clip(service)
    key = next(k for k in patched.get_sd() if k.endswith("token_embedding.weight"))
    patched.add_patches({key: (torch.ones_like(patched.get_sd()[key]),)}, strength_patch=2.0)  # a LoRA's role
    out = encode(patched)
    assert_same(out, reference(comfy_host, patched))
    assert not torch.equal(out[0][0], encode(memkit_clip(service))[0][0])
    report = service.conditioning.report()
    assert (report["ram_entries"], report["misses"]) == (1, 1), "only the unpatched encoder was cached"


def test_plain_object_patches_are_keyed_and_others_mean_encoding_anew(comfy_host, make_service, user_dir):
    """ComfyUI 0.38 gives every CLIP an object patch (``manual_cast_dtype`` = float32): a patch whose
    value is plain (a dtype, a number, a string) is part of the encoder's identity, so the cache
    stays on; one whose value is an object cannot be keyed, so that encoder is encoded anew."""
    service = make_service()
    plain = memkit_clip(service)
    model = plain.cond_stage_model
    keyed = plain.clone()
    keyed.patcher.add_object_patch("clip_name", model.clip_name)  # a plain value (and the same: same output)
    assert_same(encode(keyed), reference(comfy_host, keyed))
    assert_same(encode(keyed), reference(comfy_host, keyed))
    report = service.conditioning.report()
    assert (report["misses"], report["ram_hits"]) == (1, 1)
    encode(plain)
    assert service.conditioning.report()["misses"] == 2, "the patch is part of the identity"
    unkeyed = plain.clone()
    unkeyed.patcher.add_object_patch("dtypes", model.dtypes)  # an object (a set)
    assert_same(encode(unkeyed), reference(comfy_host, unkeyed))
    encode(unkeyed)
    report = service.conditioning.report()
    assert (report["misses"], report["ram_entries"]) == (2, 2), "never cached (nor counted as a miss)"


def test_an_encoder_from_comfyuis_own_loader_is_cached_in_ram_only(comfy_host, make_service, user_dir):
    service = make_service()
    clip = comfy_host.nodes.CLIPLoader().load_clip(CLIP_L, "stable_diffusion")[0]
    assert_same(encode(clip), reference(comfy_host, clip))
    assert_same(encode(clip), reference(comfy_host, clip))
    report = service.conditioning.report()
    assert (report["ram_hits"], report["disk_files"]) == (1, 0)
    other = comfy_host.nodes.CLIPLoader().load_clip(CLIP_L, "stable_diffusion")[0]
    encode(other)
    assert service.conditioning.report()["misses"] == 2, "another encoder object is another identity"


def by_name(text=TEXT, clip_name1=CLIP_L, clip_name2="none", type="stable_diffusion", device="default"):
    from comfyui_memkit.nodes.conditioning import MemKitTextEncodeByName

    return MemKitTextEncodeByName.execute(clip_name1=clip_name1, type=type, text=text, clip_name2=clip_name2,
                                          device=device).result[0]


def test_by_name_is_clip_text_encode_and_a_repeat_never_loads_the_encoder(comfy_host, make_service, user_dir):
    service = make_service()
    first = by_name()
    theirs = comfy_host.nodes.CLIPLoader().load_clip(CLIP_L, "stable_diffusion")[0]
    assert_same(first, reference(comfy_host, theirs))
    assert service.cache.loads == 1, "a miss loads the encoder through the cache"
    service.clear(include_pinned=True, executing_thread=True)
    assert service.cache.entries() == []
    assert_same(by_name(), first)
    assert service.cache.loads == 1, "a RAM hit loads nothing"
    restarted = make_service()  # a restart: empty model and RAM caches, the same user directory
    assert_same(by_name(), first)
    assert restarted.cache.loads == 0, "a disk hit loads nothing either"
    assert restarted.conditioning.report()["disk_hits"] == 1


def test_by_name_keys_on_the_files_their_identity_type_device_and_text(comfy_host, make_service, user_dir,
                                                                      scratch_models):
    import os
    import shutil

    service = make_service()
    base = by_name()
    assert not torch.equal(by_name("another text")[0][0], base[0][0])
    on_cpu = by_name(device="cpu")
    assert_same(on_cpu, base)  # this machine's default device is the CPU: same numbers, separate entry
    dual = by_name(clip_name2="memkit-clip-g.safetensors", type="sdxl")
    assert dual[0][0].shape[-1] == 768 + 1280
    assert service.conditioning.report()["misses"] == 4
    own = scratch_models["text_encoders"] / "memkit-scratch-clip-l.safetensors"
    shutil.copy(comfy_host.models / "text_encoders" / CLIP_L, own)
    by_name(clip_name1=own.name)
    stat = own.stat()
    os.utime(own, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # replaced on disk
    misses = service.conditioning.report()["misses"]
    by_name(clip_name1=own.name)
    assert service.conditioning.report()["misses"] == misses + 1, "a changed file is a new encoder"


def test_by_name_with_a_missing_file_names_the_folder(comfy_host, make_service, user_dir):
    make_service()
    with pytest.raises(FileNotFoundError, match=r"'nope\.safetensors' is not a file in ComfyUI's 'text_encoders'"):
        by_name(clip_name1="nope.safetensors")
