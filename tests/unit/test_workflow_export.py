"""scripts/export_workflows.py's files: what it writes, what ``--check`` reports, what it removes.

The export itself is the page's (``app.graphToPrompt``), here a stand-in; tests/e2e/test_page.py
runs the script's export on the real page against the committed API files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import export_workflows as ew


def stand_in(workflow: dict) -> dict:
    """One API node per UI node, as a page would export it."""
    return {str(n["id"]): {"inputs": {}, "class_type": n["type"], "_meta": {"title": n["type"]}}
            for n in workflow["nodes"]}


def test_export_all_writes_checks_and_removes_orphans(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps({"nodes": [{"id": 1, "type": "Loader"}]}))
    assert ew.export_all(stand_in, check=True, folder=tmp_path) == ["one.json"]
    assert not (tmp_path / "api").exists(), "check writes nothing"
    assert ew.export_all(stand_in, folder=tmp_path) == ["one.json"]
    assert (tmp_path / "api" / "one.json").read_text() == (
        '{\n  "1": {"inputs": {}, "class_type": "Loader", "_meta": {"title": "Loader"}}\n}\n')
    assert ew.export_all(stand_in, check=True, folder=tmp_path) == []
    (tmp_path / "api" / "gone.json").write_text("{}")
    assert ew.export_all(stand_in, check=True, folder=tmp_path) == ["gone.json"]
    ew.export_all(stand_in, folder=tmp_path)
    assert not (tmp_path / "api" / "gone.json").exists()


def test_a_workflow_the_page_cannot_load_is_named(tmp_path):
    (tmp_path / "two.json").write_text(json.dumps({"nodes": [{"id": 1, "type": "Missing"}]}))

    def refuse(_workflow: dict) -> dict:
        raise ew.ExportError("this ComfyUI has no node Missing")

    with pytest.raises(ew.ExportError, match=r"^two.json: this ComfyUI has no node Missing"):
        ew.export_all(refuse, folder=tmp_path)
    assert not (tmp_path / "api").exists()
