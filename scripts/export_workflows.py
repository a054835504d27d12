#!/usr/bin/env python3
"""Export the UI-format workflows in ``workflows/`` to API format in ``workflows/api/``.

The UI files (what ComfyUI's *Save* / *Export* writes and its template browser lists) are the
source; the API files (what ``POST /prompt`` takes) are generated from them, so the two never
drift. The conversion is the page's own (ComfyUI frontend 1.32, ``graphToPrompt``): widget
values are matched to the node's widget inputs in the order of its ``/object_info`` definition
(an INT named ``seed`` / ``noise_seed`` or marked ``control_after_generate`` carries one more
value, the control, that is not sent); linked inputs become ``[node id, output slot]``; notes are
left out, muted nodes too (and inputs that pointed at them), bypassed nodes are passed through
(an input takes the bypassed node's input of the same type), reroute nodes are followed.
What it cannot do as the page does (subgraphs, primitive nodes, an upload widget, dynamic-prompt
syntax that the page resolves at random) is an error naming the node. ``_meta.title`` is the
node's saved title, else its display name from ``/object_info``; the page shows its own
translations of some core nodes' names (e.g. ``EmptyHunyuanLatentVideo``), so give such nodes a
title of their own (the page test compares the queued prompt with the export).

Usage (the node definitions come from a running ComfyUI, e.g. ``make run``)::

    python scripts/export_workflows.py [--server http://127.0.0.1:8188] [--check]

``--check`` writes nothing and exits 1 when a file in ``workflows/api/`` is not what its UI
source exports to. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
API_DIR = WORKFLOWS / "api"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # virtual nodes of the page: never sent
REROUTE = "Reroute"
MODE_NEVER, MODE_BYPASS = 2, 4
CONTROL_SEED_NAMES = ("seed", "noise_seed")

log = logging.getLogger("memkit.workflows")


class ConversionError(ValueError):
    """A UI workflow that cannot be exported as the page would export it."""


def widget_inputs(node_type: str, info: dict[str, Any]) -> list[tuple[str, int]]:
    """(input name, number of widget values it takes) for each widget of a node, in order."""
    order = info.get("input_order") or {part: list(specs) for part, specs in info.get("input", {}).items()}
    widgets = []
    for part in ("required", "optional"):
        specs = info.get("input", {}).get(part, {})
        for name in order.get(part, []):
            spec = specs.get(name)
            if spec is None:
                continue
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            is_combo = isinstance(kind, list) or kind == "COMBO"
            if not is_combo and kind not in WIDGET_TYPES:
                continue  # a socket (MODEL, LATENT, ...)
            if options.get("forceInput"):
                continue
            if options.get("image_upload") or options.get("video_upload") or options.get("audio_upload"):
                raise ConversionError(f"{node_type}: input '{name}' has an upload widget, which this exporter does "
                                      "not support")
            control = options.get("control_after_generate")
            if is_combo and control:
                raise ConversionError(f"{node_type}: combo '{name}' with control_after_generate is not supported")
            has_control = kind == "INT" and (control if control is not None else name in CONTROL_SEED_NAMES)
            widgets.append((name, 2 if has_control else 1))
    return widgets


def _dynamic_prompt_inputs(info: dict[str, Any]) -> set[str]:
    return {name for part in ("required", "optional") for name, spec in info.get("input", {}).get(part, {}).items()
            if spec and spec[0] == "STRING" and len(spec) > 1 and isinstance(spec[1], dict)
            and spec[1].get("dynamicPrompts")}


def _links(workflow: dict[str, Any]) -> dict[int, tuple[int, int]]:
    """link id -> (origin node id, origin slot), for both link forms ComfyUI writes."""
    found = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            found[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            found[link[0]] = (link[1], link[2])
    return found


def ui_to_api(workflow: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """The API-format prompt the page sends for this UI-format workflow."""
    if workflow.get("definitions", {}).get("subgraphs"):
        raise ConversionError("the workflow has subgraphs, which this exporter does not support")
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = _links(workflow)

    def resolve(node_id: int, slot: int) -> tuple[int, int] | None:
        """The real output behind a link: through reroutes and bypassed nodes; None if muted/absent."""
        node = nodes.get(node_id)
        if node is None or node.get("mode", 0) == MODE_NEVER:
            return None
        if node["type"] == REROUTE:
            link = (node.get("inputs") or [{}])[0].get("link")
            return resolve(*links[link]) if link in links else None
        if node.get("mode", 0) == MODE_BYPASS:  # the first input of the output's type stands in for it
            outputs, inputs = node.get("outputs", []), node.get("inputs", [])
            wanted = outputs[slot].get("type") if slot < len(outputs) else None
            for index in [slot, *range(len(inputs))]:
                if index < len(inputs) and inputs[index].get("type") == wanted:
                    link = inputs[index].get("link")
                    return resolve(*links[link]) if link in links else None
            return None
        return node_id, slot

    prompt: dict[str, Any] = {}
    for node_id in sorted(nodes):
        node = nodes[node_id]
        kind = node["type"]
        if kind in FRONTEND_ONLY or kind == REROUTE or node.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
            continue
        where = f"node {node_id} ({kind})"
        if kind == "PrimitiveNode":
            raise ConversionError(f"{where}: primitive nodes are not supported; put the value on the widget")
        info = object_info.get(kind)
        if info is None:
            raise ConversionError(f"{where}: this ComfyUI has no node '{kind}' (is its node pack installed?)")
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values", [])
        widgets = widget_inputs(kind, info)
        if isinstance(values, dict):
            inputs.update({name: values[name] for name, _ in widgets if name in values})
        else:
            expected = sum(count for _, count in widgets)
            if len(values) != expected:
                names = ", ".join(name for name, _ in widgets) or "none"
                raise ConversionError(f"{where}: {len(values)} widget values, but this ComfyUI's {kind} takes "
                                      f"{expected} (widgets: {names}; seeds carry a control value)")
            position = 0
            for name, count in widgets:
                inputs[name] = values[position]
                position += count
        for name in _dynamic_prompt_inputs(info) & inputs.keys():
            text = inputs[name]
            if isinstance(text, str) and any(mark in text for mark in ("{", "//", "/*")):
                raise ConversionError(f"{where}: '{name}' uses dynamic-prompt syntax ({{a|b}} or comments), which the "
                                      "page resolves when it queues: its API form is not fixed")
        inputs = {name: {"__value__": value} if isinstance(value, list) else value for name, value in inputs.items()}
        for slot in node.get("inputs", []):
            link = slot.get("link")
            if link is None or link not in links:
                continue
            origin = resolve(*links[link])
            if origin is None:
                inputs.pop(slot["name"], None)
            else:
                inputs[slot["name"]] = [str(origin[0]), int(origin[1])]
        title = node.get("title") or info.get("display_name") or kind
        prompt[str(node_id)] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    for entry in prompt.values():  # as the page: links to nodes that are not sent are dropped
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def dumps(prompt: dict[str, Any]) -> str:
    """One node per line: short files whose diffs show which node changed."""
    lines = [f"  {json.dumps(key)}: {json.dumps(node, ensure_ascii=False)}" for key, node in prompt.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def ui_workflows(folder: Path = WORKFLOWS) -> list[Path]:
    """The UI-format workflows: the .json files of ``workflows/`` itself (what the template browser lists)."""
    return sorted(folder.glob("*.json"))


def export_all(object_info: dict[str, Any], check: bool = False, folder: Path = WORKFLOWS) -> list[str]:
    """Write (or with ``check`` compare) every API file; returns the names that were out of date."""
    api_dir = folder / "api"
    stale = []
    expected = set()
    for source in ui_workflows(folder):
        target = api_dir / source.name
        expected.add(target.name)
        text = dumps(ui_to_api(json.loads(source.read_text()), object_info))
        if not target.is_file() or target.read_text() != text:
            stale.append(target.name)
            if not check:
                api_dir.mkdir(exist_ok=True)
                target.write_text(text)
                log.info("wrote %s", target.relative_to(REPO) if target.is_relative_to(REPO) else target)
    orphans = sorted(p.name for p in api_dir.glob("*.json") if p.name not in expected)
    for name in orphans:  # an API file whose UI source is gone
        stale.append(name)
        if not check:
            (api_dir / name).unlink()
            log.info("removed %s (no UI workflow of that name)", name)
    return stale


def fetch_object_info(server: str) -> dict[str, Any]:
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=120) as response:
        return json.loads(response.read())


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8188",
                        help="a running ComfyUI with this package (default: make run's address)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    args = parser.parse_args()
    try:
        object_info = fetch_object_info(args.server)
    except OSError as error:
        log.error("could not read %s/object_info (%s): start `make run` first, or pass --server", args.server, error)
        return 2
    try:
        stale = export_all(object_info, check=args.check)
    except ConversionError as error:
        log.error("%s", error)
        return 1
    if args.check and stale:
        log.error("out of date in workflows/api/: %s (run `make workflows`)", ", ".join(stale))
        return 1
    log.info("workflows/api/ is up to date" if not stale else f"{len(stale)} file(s) updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
