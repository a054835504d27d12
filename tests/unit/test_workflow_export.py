"""scripts/export_workflows.py: UI-format workflow -> API format, as ComfyUI's page converts it.

The node definitions below have the shapes of ComfyUI 0.3.75's /object_info (a V1 node with a
list combo and a seed, a V3 node with a "COMBO" input); the e2e tests check the exporter against
the real /object_info (tests/e2e/test_workflows.py) and against the prompt the real page queues
(tests/e2e/test_page.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import export_workflows as ew  # noqa: E402

OBJECT_INFO = {
    "Loader": {"display_name": "Load Thing", "input": {"required": {"name": [["a.safetensors", "b.safetensors"], {}]}},
               "input_order": {"required": ["name"]}},
    "Sampler": {"display_name": "Sampler",
                "input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
                                       "steps": ["INT", {"default": 20}], "cfg": ["FLOAT", {}],
                                       "sampler_name": ["COMBO", {"options": ["euler", "dpm"]}]},
                          "optional": {"extra": ["STRING", {"forceInput": True}], "flag": ["BOOLEAN", {}]}},
                "input_order": {"required": ["model", "seed", "steps", "cfg", "sampler_name"],
                                "optional": ["extra", "flag"]}},
    "Patch": {"display_name": "Patch Model", "input": {"required": {"model": ["MODEL", {}]}},
              "input_order": {"required": ["model"]}},
    "Encode": {"display_name": "Encode", "input": {"required": {"text": ["STRING", {"dynamicPrompts": True}]}},
               "input_order": {"required": ["text"]}},
    "Sizes": {"display_name": "Sizes", "input": {"required": {"sizes": ["STRING", {}]}},
              "input_order": {"required": ["sizes"]}},
}


def node(node_id, kind, widgets=(), inputs=(), outputs=(), **extra):
    return {"id": node_id, "type": kind, "mode": 0, "widgets_values": list(widgets),
            "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": t, "type": t, "links": []} for t in outputs], **extra}


def graph(*nodes, links=()):
    return {"nodes": list(nodes), "links": [list(link) for link in links], "version": 0.4}


def sampler(node_id=3, model_link=1, mode=0, **extra):
    return node(node_id, "Sampler", [7, "fixed", 4, 6.5, "euler", True], [("model", "MODEL", model_link)],
                ["LATENT"], mode=mode, **extra)


def test_widgets_follow_the_definition_order_and_the_seed_control_is_not_sent():
    workflow = graph(node(1, "Loader", ["b.safetensors"], outputs=["MODEL"], title="My loader"),
                     node(2, "Loader", ["a.safetensors"], outputs=["MODEL"]), sampler(),
                     node(9, "MarkdownNote", ["# read me"]), links=[(1, 1, 0, 3, 0, "MODEL")])
    assert ew.ui_to_api(workflow, OBJECT_INFO) == {
        "1": {"inputs": {"name": "b.safetensors"}, "class_type": "Loader", "_meta": {"title": "My loader"}},
        "2": {"inputs": {"name": "a.safetensors"}, "class_type": "Loader", "_meta": {"title": "Load Thing"}},
        "3": {"inputs": {"seed": 7, "steps": 4, "cfg": 6.5, "sampler_name": "euler", "flag": True,
                         "model": ["1", 0]}, "class_type": "Sampler", "_meta": {"title": "Sampler"}},
    }


def test_a_linked_widget_input_takes_the_link():
    workflow = graph(node(1, "Loader", ["a.safetensors"], outputs=["MODEL"]),
                     node(2, "Sizes", ["5"], outputs=["INT"]),
                     node(3, "Sampler", [7, "fixed", 4, 6.5, "euler", False],
                          [("model", "MODEL", 1), ("steps", "INT", 2)], ["LATENT"]),
                     links=[(1, 1, 0, 3, 0, "MODEL"), (2, 2, 0, 3, 1, "INT")])
    assert ew.ui_to_api(workflow, OBJECT_INFO)["3"]["inputs"]["steps"] == ["2", 0]


def test_bypassed_nodes_pass_their_input_through_reroutes_are_followed_muted_nodes_drop_out():
    loader = node(1, "Loader", ["a.safetensors"], outputs=["MODEL"])
    bypassed = node(2, "Patch", [], [("model", "MODEL", 1)], ["MODEL"], mode=4)
    reroute = node(5, "Reroute", [], [("", "*", 2)], ["MODEL"])
    workflow = graph(loader, bypassed, reroute, sampler(model_link=3),
                     links=[(1, 1, 0, 2, 0, "MODEL"), (2, 2, 0, 5, 0, "MODEL"), (3, 5, 0, 3, 0, "MODEL")])
    prompt = ew.ui_to_api(workflow, OBJECT_INFO)
    assert sorted(prompt) == ["1", "3"]
    assert prompt["3"]["inputs"]["model"] == ["1", 0]
    loader["mode"] = 2  # muted: not sent, and the input that pointed at it is left out
    prompt = ew.ui_to_api(workflow, OBJECT_INFO)
    assert sorted(prompt) == ["3"]
    assert "model" not in prompt["3"]["inputs"]


def test_list_values_are_wrapped_as_the_page_sends_them():
    workflow = graph(node(1, "Sizes", [[1, 2]]))
    assert ew.ui_to_api(workflow, OBJECT_INFO)["1"]["inputs"] == {"sizes": {"__value__": [1, 2]}}


def test_a_widget_count_that_does_not_fit_the_definition_names_the_node_and_its_widgets():
    workflow = graph(node(4, "Sampler", [7, 4, 6.5, "euler", True], [("model", "MODEL", None)]))
    with pytest.raises(ew.ConversionError, match=r"node 4 \(Sampler\): 5 widget values, but this ComfyUI's Sampler "
                                                 r"takes 6 \(widgets: seed, steps, cfg, sampler_name, flag"):
        ew.ui_to_api(workflow, OBJECT_INFO)


@pytest.mark.parametrize(("workflow", "message"), [
    (graph(node(1, "Missing")), r"node 1 \(Missing\): this ComfyUI has no node 'Missing'"),
    (graph(node(2, "Encode", ["a {red|blue} fox"])), r"node 2 \(Encode\): 'text' uses dynamic-prompt syntax"),
    (graph(node(3, "PrimitiveNode", [5])), r"node 3 \(PrimitiveNode\): primitive nodes are not supported"),
    ({**graph(), "definitions": {"subgraphs": [{"id": "x"}]}}, "subgraphs"),
])
def test_what_the_page_would_send_differently_is_refused(workflow, message):
    with pytest.raises(ew.ConversionError, match=message):
        ew.ui_to_api(workflow, OBJECT_INFO)


def test_export_all_writes_checks_and_removes_orphans(tmp_path):
    (tmp_path / "one.json").write_text(json.dumps(graph(node(1, "Loader", ["a.safetensors"]))))
    assert ew.export_all(OBJECT_INFO, check=True, folder=tmp_path) == ["one.json"]
    assert not (tmp_path / "api").exists(), "check writes nothing"
    assert ew.export_all(OBJECT_INFO, folder=tmp_path) == ["one.json"]
    assert json.loads((tmp_path / "api" / "one.json").read_text())["1"]["inputs"] == {"name": "a.safetensors"}
    assert ew.export_all(OBJECT_INFO, check=True, folder=tmp_path) == []
    (tmp_path / "api" / "gone.json").write_text("{}")
    assert ew.export_all(OBJECT_INFO, check=True, folder=tmp_path) == ["gone.json"]
    ew.export_all(OBJECT_INFO, folder=tmp_path)
    assert not (tmp_path / "api" / "gone.json").exists()


def test_every_shipped_ui_workflow_has_its_api_export_and_a_thumbnail():
    sources = ew.ui_workflows()
    assert len(sources) >= 5
    for source in sources:
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
    notes = [n for n in workflow["nodes"] if n["type"] in ew.FRONTEND_ONLY]
    if not any(str((n.get("widgets_values") or [""])[0]).strip() for n in notes):
        problems.append("no note node that says what the workflow shows")

    def inside(node: dict, group: dict) -> bool:
        gx, gy, gw, gh = group["bounding"]
        head = group.get("font_size", 24) * 1.4  # the group's title bar
        (x, y), (w, h) = node["pos"], node["size"]
        return gx <= x and x + w <= gx + gw and gy + head <= y - NODE_TITLE_HEIGHT and y + h <= gy + gh

    boxed = [g for g in groups if len(g.get("bounding", [])) == 4]
    for n in workflow["nodes"]:
        if n["type"] not in ew.FRONTEND_ONLY and not any(inside(n, g) for g in boxed):
            problems.append(f"node {n['id']} ({n['type']}) is in no group")
    return problems


def test_every_shipped_ui_workflow_is_grouped_with_every_node_in_a_group_and_has_a_note():
    for source in ew.ui_workflows():
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
    no_note = [n for n in workflow["nodes"] if n["type"] not in ew.FRONTEND_ONLY]
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
    for source in ew.ui_workflows():
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
