"""The shared weight store in this process with ComfyUI's real loaders (``settings.shared_weights``).

A "second process" here is a fresh MemKit service on the same store directory: it has nothing
cached and maps the store file as another process would (its own copy-on-write mapping). The
cross-process behaviour (two servers, PSS, a restart) is in tests/e2e/test_shared_weights.py.
"""

from __future__ import annotations

import gc
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest
import torch
from support.memory import drop_from_page_cache, resident_bytes

from comfyui_memkit.model_cache import comfy_models
from comfyui_memkit.model_cache.loads import Load
from comfyui_memkit.model_cache.recipe import ModelKind
from comfyui_memkit.model_cache.status import build_status
from comfyui_memkit.model_cache.weight_sharing import store_key
from comfyui_memkit.model_cache.weight_store import WeightStore

VAE = Load.loader(ModelKind.VAE, ["memkit-sd-vae.safetensors"])
TEXT_ENCODER = Load.loader(ModelKind.TEXT_ENCODER, ["memkit-clip-l.safetensors"])
DIFFUSION_MODEL = Load.loader(ModelKind.DIFFUSION_MODEL, ["memkit-wan21-t2v-tiny.safetensors"])


@pytest.fixture
def store_dir():
    directory = Path("/dev/shm") / f"memkit-host-{uuid.uuid4().hex[:8]}"
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def sharing_service(make_service, store_dir):
    def build(**settings):
        return make_service(shared_weights={"enabled": True, "directory": str(store_dir)}, **settings)
    return build


def state_of(value) -> dict[str, torch.Tensor]:
    """Every tensor of every part, by part and name."""
    tensors = {}
    for index, part in enumerate(value.parts):
        module = comfy_models.module_of(part)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            tensors[f"{index}.{name}"] = tensor
    return tensors


def assert_same_model(value, reference) -> None:
    ours, theirs = state_of(value), state_of(reference)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert (ours[name].dtype, ours[name].shape) == (tensor.dtype, tensor.shape), name
        assert torch.equal(ours[name], tensor), name
    assert [type(p) for p in value.parts] == [type(p) for p in reference.parts]


@pytest.mark.parametrize("load", [VAE, TEXT_ENCODER, DIFFUSION_MODEL], ids=lambda load: load.kind.value)
def test_a_second_process_builds_the_model_from_the_store_without_reading_its_file(sharing_service, load, release):
    first = sharing_service()
    written = first.request(load).value
    assert written.sharing.state == "written", written.sharing.reason
    path = first.recipe(load).paths[0]
    del written
    release()

    drop_from_page_cache(path)
    second = sharing_service()
    mapped = second.request(load).value
    assert mapped.sharing.state == "mapped", mapped.sharing.reason
    read = resident_bytes(path)
    assert read < 1 << 20, f"building from the store read {read} bytes of {os.path.getsize(path)} of the model file"
    reference = comfy_models.load(second.recipe(load).call, load.kind.kept_outputs)  # ComfyUI's own, private
    assert resident_bytes(path) > os.path.getsize(path) // 2, "the residency check would not see a read"
    assert_same_model(mapped, reference)
    for tensor in state_of(mapped).values():
        assert mapped.sharing.holds(tensor), "every tensor is a view of the store's mapping"


def test_the_model_built_from_the_store_decodes_like_comfyuis_own(sharing_service, release):
    sharing_service().request(VAE)
    release()
    vae = sharing_service().request(VAE).value
    assert vae.sharing.state == "mapped"
    reference = comfy_models.load(VAE.call, 1).parts[0]
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(vae.parts[0].decode(latent), reference.decode(latent))


def test_an_in_place_edit_stays_in_the_copy_that_made_it(sharing_service, store_dir, release):
    sharing_service().request(VAE)
    release()
    edited = sharing_service().request(VAE).value  # built from the store: a mapping of its own
    other = WeightStore(store_dir, 1 << 40).open(edited.sharing.store_key)  # another process's mapping
    name, weight = next((n, t) for n, t in state_of(edited).items() if t.numel() > 1 << 20)
    original = weight.clone()
    before = comfy_models.footprint(edited)
    weight.add_(1.0)  # what a careless node does to a model it was handed

    assert torch.equal(other.tensors()[name], original), "another mapping of the file is untouched"
    fresh = WeightStore(store_dir, 1 << 40).open(edited.sharing.store_key)
    assert torch.equal(fresh.tensors()[name], original), "the store file never changes"
    edited_bytes = weight.numel() * weight.element_size()
    deadline = time.monotonic() + 30  # footprint reuses a reading of /proc/self/smaps up to 1 s old
    while (after := comfy_models.footprint(edited)).ram - before.ram < edited_bytes * 0.9 \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after.ram - before.ram >= edited_bytes * 0.9, "the copied pages are this process's private RAM"
    assert after.shared <= before.shared - edited_bytes * 0.9
    other.close()
    fresh.close()


def test_status_counts_shared_bytes_apart_from_the_budget(sharing_service, release):
    service = sharing_service()
    service.request(VAE)
    status = build_status(service)
    (row,) = status["entries"]
    assert row["ram_bytes"] < 1 << 20, "the budget counts private bytes only"
    assert row["shared_bytes"] > 300 << 20
    assert row["sharing"]["state"] == "written"
    assert row["sharing"]["processes"] in (1, None)
    assert status["totals"]["shared_bytes"] == row["shared_bytes"]
    assert status["shared_weights"]["enabled"] is True
    assert status["shared_weights"]["used_bytes"] >= row["shared_bytes"]
    release()
    second = sharing_service()
    assert second._load_peak_ram(second.recipe(VAE)) == 0, "a build from the store reserves no RAM"
    assert second._load_peak_ram(second.recipe(TEXT_ENCODER)) > 0


def test_a_changed_file_is_a_new_store_file_and_the_stale_one_goes(sharing_service, scratch_models, store_dir,
                                                                  release):
    source = Path(comfy_models.resolve(ModelKind.VAE, "memkit-sd-vae.safetensors"))
    target = scratch_models["vae"] / "memkit-scratch-vae.safetensors"
    shutil.copyfile(source, target)
    load = Load.loader(ModelKind.VAE, [target.name])
    service = sharing_service()
    old_key = store_key(service.recipe(load))
    assert service.request(load).value.sharing.state == "written"
    del service  # this process lets go of the old version: nothing maps its store file any more
    release()

    shutil.copyfile(source, target)  # the same bytes, written again: a new inode or ctime
    service = sharing_service()
    new_key = store_key(service.recipe(load))
    assert new_key != old_key
    value = service.request(load).value
    assert value.sharing.state == "written"
    assert value.sharing.store_key == new_key
    kept = WeightStore(store_dir, 1 << 40).keys()
    assert old_key not in kept, "the service's start-up sweep removes the stale file"
    assert new_key in kept


def test_a_store_directory_others_can_write_turns_sharing_off_with_the_reason(make_service, store_dir):
    store_dir.mkdir(mode=0o700)
    store_dir.chmod(0o777)
    service = make_service(shared_weights={"enabled": True, "directory": str(store_dir)})
    assert service.sharing is None
    status = build_status(service)
    assert status["shared_weights"]["enabled"] is False
    assert "writable by others" in status["shared_weights"]["reason"]
    value = service.request(VAE).value  # loads stay private and work
    assert value.sharing is None
    assert comfy_models.footprint(value).ram > 300 << 20


def test_a_loader_without_a_build_from_the_store_still_shares_after_it_builds(sharing_service, release):
    load = Load.node("CLIPVisionLoader", {"clip_name": "memkit-clip-vision-vitl.safetensors"})
    first = sharing_service().request(load).value
    assert first.sharing.state == "written", first.sharing.reason
    del first
    release()
    gc.collect()
    again = sharing_service().request(load).value
    assert again.sharing.state == "mapped-after-load", again.sharing.reason
    assert comfy_models.footprint(again).ram < 1 << 20, "its private copy went once it was pointed at the store"


def test_weights_moved_off_the_mapping_show_as_lost_and_count_against_the_budget(sharing_service):
    """What ComfyUI's offload does to a model moved to the GPU and back (new tensors in RAM), done
    on the CPU: status must stop calling those bytes shared and the budget must see them."""
    service = sharing_service()
    value = service.request(VAE).value
    (row,) = build_status(service)["entries"]
    assert row["sharing"]["state"] == "written"
    value.parts[0].first_stage_model._apply(lambda tensor: tensor.clone())  # every tensor now a private copy
    service.cache.remeasure()
    (row,) = build_status(service)["entries"]
    assert row["sharing"]["state"] == "lost"
    assert "moved off the shared mapping" in row["sharing"]["reason"]
    assert row["shared_bytes"] == 0
    assert row["ram_bytes"] > 300 << 20


def test_a_store_directory_made_again_meanwhile_is_never_used_and_the_load_still_works(sharing_service, store_dir):
    """/dev/shm is every user's: a store directory removed while ComfyUI runs (``rm -r``, logind's
    RemoveIPC) could be made again by someone else, with files this process would map as weights."""
    service = sharing_service()
    shutil.rmtree(store_dir)
    store_dir.mkdir(mode=0o700)  # the same name, another directory
    value = service.request(VAE).value
    assert value.sharing.state == "private"
    assert "not the directory this process checked" in value.sharing.reason
    assert comfy_models.footprint(value).ram > 300 << 20, "a private copy, loaded as without sharing"
    assert list(store_dir.iterdir()) == [], "nothing written to or read from the new directory"
