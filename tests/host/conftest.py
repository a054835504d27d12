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
    service_module.reset_service(PreloadConfig(path=None))


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
