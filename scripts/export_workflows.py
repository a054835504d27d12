#!/usr/bin/env python3
"""Export the UI-format workflows in ``workflows/`` to API format in ``workflows/api/``.

The UI files (what ComfyUI's *Save* / *Export* writes and its template browser lists) are the
source; the API files (what ``POST /prompt`` takes) are generated from them. The page is the
truth, so the conversion is the page's own rather than a copy that drifts with each frontend
release: each UI file is loaded into ComfyUI's frontend in a headless Chromium (Playwright, the
system's Chromium as the page tests use it) with ``app.loadGraphData``, and
``(await app.graphToPrompt()).output`` is written: what the page queues when you press *Run* (the
page tests check exactly that). Widget order, seed controls, bypassed and muted nodes, reroutes,
subgraphs and titles are whatever this ComfyUI's page makes of them.

Usage (needs a running ComfyUI with this package, e.g. ``make run``)::

    python scripts/export_workflows.py [--server http://127.0.0.1:8188] [--check]

``--check`` writes nothing and exits 1 when a file in ``workflows/api/`` is not what its UI
source exports to; API files whose UI source is gone are removed (or, with ``--check``, reported).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from host import CHROMIUM_HINT, find_chromium  # scripts/host.py: the Chromium the page tests use

if TYPE_CHECKING:
    from playwright.sync_api import Page

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
# app.loadGraphData(graph, clean, restore_view, workflow, options) of ComfyUI's frontend (1.32)
LOAD_AND_EXPORT = """async ([graph, subgraphs]) => {
    const missing = [...new Set(graph.nodes.map(n => n.type))]
        .filter(type => !(type in LiteGraph.registered_node_types) && !subgraphs.includes(type));
    if (missing.length) return {missing};
    await app.loadGraphData(graph, true, true, null, {showMissingModelsDialog: false, showMissingNodesDialog: false});
    return {ids: app.graph.nodes.map(n => n.id), output: (await app.graphToPrompt()).output};
}"""
# window.app is set once the node definitions are registered; the page then loads its first workflow
# (which would replace one loaded before it) and only then has an active workflow.
PAGE_READY = "() => window.app?.extensionManager?.workflow?.activeWorkflow"

log = logging.getLogger("memkit.workflows")
Export = Callable[[dict[str, Any]], dict[str, Any]]


class ExportError(RuntimeError):
    """A UI workflow the page could not load as it is."""


def ui_workflows(folder: Path = WORKFLOWS) -> list[Path]:
    """The UI-format workflows: the .json files of ``workflows/`` itself (what the template browser lists)."""
    return sorted(folder.glob("*.json"))


def dumps(prompt: dict[str, Any]) -> str:
    """One node per line: short files whose diffs show which node changed."""
    lines = [f"  {json.dumps(key)}: {json.dumps(node, ensure_ascii=False)}" for key, node in prompt.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def page_export(page: Page, workflow: dict[str, Any]) -> dict[str, Any]:
    """What the page (a Playwright page on ComfyUI) queues for this UI-format workflow."""
    page.wait_for_function(PAGE_READY, timeout=120_000)
    subgraphs = [s["id"] for s in (workflow.get("definitions") or {}).get("subgraphs") or []]
    result = page.evaluate(LOAD_AND_EXPORT, [workflow, subgraphs])
    if result.get("missing"):
        raise ExportError(f"this ComfyUI has no node {', '.join(result['missing'])} (is its node pack installed?)")
    if sorted(result["ids"]) != sorted(node["id"] for node in workflow["nodes"]):
        raise ExportError(f"the page holds nodes {sorted(result['ids'])} after loading, not the file's")
    return result["output"]


def export_all(export: Export, check: bool = False, folder: Path = WORKFLOWS) -> list[str]:
    """Write (or with ``check`` compare) every API file; returns the names that were out of date."""
    api_dir = folder / "api"
    stale = []
    sources = ui_workflows(folder)
    for source in sources:
        target = api_dir / source.name
        try:
            text = dumps(export(json.loads(source.read_text())))
        except ExportError as error:
            raise ExportError(f"{source.name}: {error}") from None
        if not target.is_file() or target.read_text() != text:
            stale.append(target.name)
            if not check:
                api_dir.mkdir(exist_ok=True)
                target.write_text(text)
                log.info("wrote %s", target.relative_to(folder.parent))
    names = {source.name for source in sources}
    for orphan in sorted(p for p in api_dir.glob("*.json") if p.name not in names):  # its UI source is gone
        stale.append(orphan.name)
        if not check:
            orphan.unlink()
            log.info("removed %s (no UI workflow of that name)", orphan.name)
    return stale


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="http://127.0.0.1:8188",
                        help="a running ComfyUI with this package (default: make run's address)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file is out of date")
    args = parser.parse_args()
    chromium = find_chromium()
    if chromium is None or not chromium.exists():
        log.error("%s", CHROMIUM_HINT)
        return 2
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), headless=True)
        page = browser.new_page()
        # A first visit stores settings (Comfy.TutorialCompleted); the export changes nothing on the server.
        page.route("**/api/settings**", lambda route: route.continue_() if route.request.method == "GET"
                   else route.fulfill(status=200, json={}))
        try:
            page.goto(args.server)
            stale = export_all(lambda workflow: page_export(page, workflow), check=args.check)
        except PlaywrightError as error:
            log.error("%s: %s (is `make run` running? else pass --server)", args.server, error.message.splitlines()[0])
            return 2
        except ExportError as error:
            log.error("%s", error)
            return 1
        finally:
            browser.close()
    if args.check and stale:
        log.error("out of date in workflows/api/: %s (run `make workflows`)", ", ".join(stale))
        return 1
    log.info("workflows/api/ is up to date" if not stale else f"{len(stale)} file(s) updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
