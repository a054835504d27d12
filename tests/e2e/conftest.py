"""End-to-end: one real ComfyUI server per module, with MemKit installed and a preload config."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.comfy_host import put_comfy_first_on_path
from support.comfy_server import ComfyServer

put_comfy_first_on_path()  # for comfy_execution.graph_utils.GraphBuilder

NODE_PACK = Path(__file__).resolve().parent / "node_pack"  # test-only nodes (MemKitTestPatchInPlace)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (the page fixture saves a screenshot on failure)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def write_config(path: Path, models: dict, **settings) -> Path:
    path.write_text(json.dumps({"version": 1, "settings": settings, "models": models}, indent=2))
    return path


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    servers = []

    def start(config_models: dict | None, extra_args: list[str] | None = None, config_file: Path | None = None,
              **settings) -> ComfyServer:
        base = tmp_path_factory.mktemp("comfy")
        config = write_config(base / "preload_config.json", config_models, **settings) if config_models else None
        server = ComfyServer(base, Path(os.environ["MEMKIT_MODELS"]), config_file or config, extra_args,
                             node_packs=[NODE_PACK])
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
