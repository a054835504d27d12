"""In-process tests: the real ComfyUI modules (comfy.sd, folder_paths, nodes) in this process."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from support.comfy_host import import_comfy


@pytest.fixture(scope="session")
def comfy_host():
    import_comfy()
    import folder_paths
    import nodes

    models = Path(os.environ["MEMKIT_MODELS"])
    for folder in models.iterdir():
        if folder.is_dir():
            folder_paths.add_model_folder_path(folder.name, str(folder))
    return SimpleNamespace(folder_paths=folder_paths, nodes=nodes, models=models)


@pytest.fixture
def make_service(comfy_host):
    """A fresh MemKit service with the given settings and entries (the process-wide one)."""
    from comfyui_memkit.model_cache import service as service_module
    from comfyui_memkit.model_cache.config import PreloadConfig, Settings

    def build(entries=(), **settings):
        return service_module.reset_service(PreloadConfig(path=None, settings=Settings(**settings),
                                                          entries=list(entries)))

    yield build
    release_everything()  # the test's models go now, not at the end of the module


@pytest.fixture
def scratch_models(comfy_host, tmp_path):
    """A model folder of our own inside ComfyUI's search paths, for files we change or break."""
    folders = {}
    for name in ("vae", "checkpoints", "diffusion_models", "text_encoders"):
        folder = tmp_path / name
        folder.mkdir()
        comfy_host.folder_paths.add_model_folder_path(name, str(folder))
        folders[name] = folder
    yield folders
    for name, folder in folders.items():
        paths = comfy_host.folder_paths.folder_names_and_paths[name][0]
        if str(folder) in paths:
            paths.remove(str(folder))


@pytest.fixture
def release():
    """``release_everything``, for tests that drop their models midway (a process's models gone)."""
    return release_everything


def release_everything() -> None:
    """What the process holds at rest: the service reset, ComfyUI's models unloaded and its
    loaded-model list cleaned, reference cycles collected and the C heap trimmed."""
    import comfy.model_management as mm

    from comfyui_memkit.model_cache import service as service_module
    from comfyui_memkit.model_cache.config import PreloadConfig

    service_module.reset_service(PreloadConfig(path=None))
    mm.unload_all_models()
    mm.cleanup_models()
    service_module.reclaim_memory()


@pytest.fixture(scope="module", autouse=True)
def release_models_after_each_module(comfy_host):
    """Every in-process module starts from what the process holds at rest. Without this, models
    that one module's fixtures or the process-wide service kept alive piled up (17 GB RSS by the
    VAE tests), which a CI machine with less RAM turns into hours of paging.
    ``MEMKIT_RSS_LOG=path`` appends each module's RSS before and after the release."""
    yield
    import psutil

    before = psutil.Process().memory_info().rss
    release_everything()
    if os.environ.get("MEMKIT_RSS_LOG"):
        after = psutil.Process().memory_info().rss
        with open(os.environ["MEMKIT_RSS_LOG"], "a") as log:
            log.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split('::')[0]} "
                      f"rss {before / 2**20:.0f} MB -> {after / 2**20:.0f} MB\n")
