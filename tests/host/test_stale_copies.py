"""A cached model whose file changes on disk and no longer loads keeps being served, shown as
stale (never plainly ready), and is ready again once its file loads."""

from __future__ import annotations

import os
import shutil

from comfyui_memkit.model_cache.loads import Load
from comfyui_memkit.model_cache.recipe import ModelKind
from comfyui_memkit.model_cache.status import build_status, readiness


def row(service, key):
    return next(r for r in build_status(service)["entries"] if r["cache_key"] == key)


def test_truncated_then_removed_then_restored(make_service, comfy_host, scratch_models):
    source = comfy_host.models / "vae" / "memkit-sd-vae.safetensors"
    path = scratch_models["vae"] / "memkit-scratch-vae.safetensors"
    shutil.copyfile(source, path)
    service = make_service()
    names = ["memkit-scratch-vae.safetensors"]
    first = service.request(Load.loader(ModelKind.VAE, names, {}))
    key = first.entry.cache_key
    assert row(service, key)["state"] == "ready"
    assert readiness(service)["state"] == "ready"

    with open(path, "r+b") as handle:  # cut short, as a copy in progress leaves it
        handle.truncate(os.path.getsize(path) // 3)
    again = service.request(Load.loader(ModelKind.VAE, names, {}))
    assert again.value is first.value, "the copy already loaded keeps being served"
    stale = row(service, key)
    assert stale["state"] == "stale"
    assert "could not load" in stale["error"]
    assert readiness(service)["state"] == "degraded"
    assert readiness(service)["stale"] == [key]
    assert [r["cache_key"] for r in build_status(service)["entries"]].count(key) == 1, "one row per key"

    path.unlink()
    assert service.request(Load.loader(ModelKind.VAE, names, {})).value is first.value
    assert "is not a file" in row(service, key)["error"]

    shutil.copyfile(source, path)  # whole again: a new identity that loads
    fresh = service.request(Load.loader(ModelKind.VAE, names, {}))
    assert fresh.value is not first.value
    assert row(service, key)["state"] == "ready"
    assert "error" not in row(service, key)
    assert readiness(service)["state"] == "ready"
