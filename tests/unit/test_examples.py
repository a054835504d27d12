"""The deployment examples import and their configs are valid, without deploying anything."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
from pathlib import Path

from comfyui_memkit.model_cache.config import HostChoices, load_config

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy"
CHOICES = HostChoices(clip_types=("stable_diffusion", "sdxl"), weight_dtypes=("default",))


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_modal_example_defines_its_app_and_snapshot_hooks():
    import modal

    path = EXAMPLES / "modal_snapshot" / "comfyui_memkit_app.py"
    module = _import(path)
    assert module.app.name == "comfyui-memkit"
    assert isinstance(module.ComfyUI, modal.Cls)
    tree = ast.parse(path.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ComfyUI"]
    decorators = {f.name: [ast.unparse(d) for d in f.decorator_list]
                  for f in cls.body if isinstance(f, ast.FunctionDef)}
    assert decorators["start_and_preload"] == ["modal.enter(snap=True)"]
    assert decorators["after_restore"] == ["modal.enter(snap=False)"]
    assert decorators["run"] == ["modal.method()"]


def test_the_modal_example_config_and_its_warmup_agree():
    config = load_config(EXAMPLES / "modal_snapshot" / "preload_config.json", CHOICES)
    assert config.problems == []
    assert config.settings.preload_mode == "blocking"
    assert config.settings.auto_gpu_load is True
    keys = {e.cache_key for e in config.entries}
    used = {n["inputs"]["cache_key"] for n in config.warmup_prompt.values() if n["class_type"].endswith("Selector")}
    assert used
    assert used <= keys, "the warm-up uses only configured cache keys"


def test_the_runpod_example_handler_imports_without_the_runpod_sdk_and_the_script_parses():
    module = _import(EXAMPLES / "runpod_worker" / "handler.py")
    assert callable(module.handler)
    script = EXAMPLES / "runpod_worker" / "start.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    assert script.stat().st_mode & 0o111, "start.sh is executable"
