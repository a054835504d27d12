"""The shipped workflows in workflows/: each has its API export and a thumbnail, is laid out in
groups with a note that explains it, and declares the real model files it names (for the page's
download dialog). That the API files are what the page exports is checked with the page itself
(tests/e2e/test_page.py)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UI_WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))  # what the template browser lists
NOTES = {"Note", "MarkdownNote"}  # the page's own nodes, never sent


def test_every_shipped_ui_workflow_has_its_api_export_and_a_thumbnail():
    assert len(UI_WORKFLOWS) >= 5
    for source in UI_WORKFLOWS:
        workflow = json.loads(source.read_text())
        assert isinstance(workflow.get("nodes"), list), f"{source.name} is not a UI-format workflow"
        assert (REPO / "workflows" / "api" / source.name).is_file(), f"no workflows/api/{source.name}"
        assert source.with_suffix(".jpg").is_file(), f"no thumbnail {source.stem}.jpg for the template browser"


NODE_TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar is drawn above its pos
GROUP_KEYS = {"id", "title", "bounding", "color", "font_size", "flags"}


def layout_problems(workflow: dict) -> list[str]:
    """What keeps a UI workflow from being laid out, grouped and explained: no group, no note node,
    a node (title bar included) outside every group's box or under a group's title."""
    problems = []
    groups = workflow.get("groups") or []
    if not groups:
        problems.append("no groups")
    for group in groups:  # what the frontend's LGraphGroup.serialize() writes
        if not group.keys() >= GROUP_KEYS or len(group["bounding"]) != 4:
            problems.append(f"group {group.get('title')!r} is not in the frontend's form")
    notes = [n for n in workflow["nodes"] if n["type"] in NOTES]
    if not any(str((n.get("widgets_values") or [""])[0]).strip() for n in notes):
        problems.append("no note node that says what the workflow shows")

    def inside(node: dict, group: dict) -> bool:
        gx, gy, gw, gh = group["bounding"]
        head = group.get("font_size", 24) * 1.4  # the group's title bar
        (x, y), (w, h) = node["pos"], node["size"]
        return gx <= x and x + w <= gx + gw and gy + head <= y - NODE_TITLE_HEIGHT and y + h <= gy + gh

    boxed = [g for g in groups if len(g.get("bounding", [])) == 4]
    for n in workflow["nodes"]:
        if n["type"] not in NOTES and not any(inside(n, g) for g in boxed):
            problems.append(f"node {n['id']} ({n['type']}) is in no group")
    return problems


def test_every_shipped_ui_workflow_is_grouped_with_every_node_in_a_group_and_has_a_note():
    for source in UI_WORKFLOWS:
        workflow = json.loads(source.read_text())
        assert layout_problems(workflow) == [], source.name


def test_the_layout_check_finds_a_missing_group_a_node_outside_and_a_missing_note():
    workflow = json.loads((REPO / "workflows" / "memkit_sd15_cached_loader.json").read_text())
    assert layout_problems(workflow) == []
    others = workflow["groups"][1:]  # the nodes of the first group are in none now
    assert layout_problems({**workflow, "groups": others}) == ["node 1 (MemKitCheckpointLoader) is in no group"]
    assert layout_problems({**workflow, "groups": []})[0] == "no groups"
    moved = [dict(n, pos=[n["pos"][0], n["pos"][1] - 40]) if n is workflow["nodes"][0] else n
             for n in workflow["nodes"]]  # its title bar under the group's title
    assert layout_problems({**workflow, "nodes": moved}) == [f"node 1 ({workflow['nodes'][0]['type']}) is in no group"]
    no_note = [n for n in workflow["nodes"] if n["type"] not in NOTES]
    assert layout_problems({**workflow, "nodes": no_note}) == ["no note node that says what the workflow shows"]


MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
MODEL_FOLDERS = {"checkpoints", "diffusion_models", "unet", "text_encoders", "clip", "vae", "loras", "upscale_models"}


def undeclared_models(workflow: dict) -> list[str]:
    """Model files a workflow names that the page could not offer for download: every file but the
    seeded demo ones (``memkit-*``, made by `make run`) must be in its node's ``properties.models``
    (name, url, directory), which the page checks on load (its missing-models dialog)."""
    problems = []
    for n in workflow["nodes"]:
        declared = {m.get("name"): m for m in (n.get("properties") or {}).get("models") or []}
        for value in n.get("widgets_values") or []:
            if not isinstance(value, str) or not value.endswith(MODEL_SUFFIXES) or value.startswith("memkit-"):
                continue
            model = declared.get(value)
            if model is None:
                problems.append(f"node {n['id']} ({n['type']}): {value} is not in properties.models")
            elif not str(model.get("url", "")).startswith("https://") or model.get("directory") not in MODEL_FOLDERS:
                problems.append(f"node {n['id']} ({n['type']}): {value} has no https url or known directory")
    return problems


def test_every_real_model_file_a_shipped_workflow_names_is_declared_for_the_pages_download_dialog():
    for source in UI_WORKFLOWS:
        assert undeclared_models(json.loads(source.read_text())) == [], source.name


def test_the_model_check_finds_an_undeclared_file_and_a_declaration_without_url():
    workflow = json.loads((REPO / "workflows" / "memkit_wan21_t2v.json").read_text())
    vae = next(n for n in workflow["nodes"] if n["type"] == "MemKitVAELoader")
    vae["properties"]["models"][0]["url"] = ""
    assert undeclared_models(workflow) == [f"node {vae['id']} (MemKitVAELoader): wan_2.1_vae.safetensors has no "
                                           "https url or known directory"]
    del vae["properties"]["models"]
    assert undeclared_models(workflow) == [f"node {vae['id']} (MemKitVAELoader): wan_2.1_vae.safetensors is not in "
                                           "properties.models"]
