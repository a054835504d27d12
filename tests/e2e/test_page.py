"""The page: ComfyUI's real frontend in a real Chromium (Playwright), against one real server.

The server starts like `make run` (the demo config) plus one entry whose file does not exist, so
that the panel has a failure to show. Tests run in file order: the panel first (while ComfyUI's
output cache holds no model, so a preload really loads), then every UI workflow loaded from the
template browser, the way a user does, and queued with the Run button; last, `make workflows`'
export (scripts/export_workflows.py) on this page writes exactly the committed API files.

Screenshots: a failing test leaves one (and the page's console) in ``test-artifacts/page/``.
``MEMKIT_REFRESH_SCREENSHOTS=1`` rewrites the committed ones: ``docs/screenshots/*.png`` (the
panel, a loaded workflow, the template browser) and the template browser's thumbnails
``workflows/<name>.jpg``.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import export_workflows  # noqa: E402  (scripts/export_workflows.py)
from host import CHROMIUM_HINT, PACKAGE_LINK_NAME  # noqa: E402

DEMO_CONFIG = REPO / "scripts" / "demo_preload_config.json"
CHROMIUM = Path(os.environ.get("MEMKIT_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(os.environ.get("MEMKIT_ARTIFACTS", REPO / "test-artifacts")) / "page"
DOCS = REPO / "docs" / "screenshots"
REFRESH = os.environ.get("MEMKIT_REFRESH_SCREENSHOTS") == "1"
VIEWPORT = {"width": 1400, "height": 900}

MISSING = {"name": "memkit-missing.safetensors", "cache_key": "demo-missing",
           "description": "a file that is not there: the panel shows why it failed"}
UI_WORKFLOWS = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
NOT_RUN = {"memkit_wan21_t2v"}  # real Wan 2.1 files: see its own test below
RUN = [name for name in UI_WORKFLOWS if name not in NOT_RUN]
ANIMATIONS = {"memkit_wan21_video_tiled_decode": (9, 128, 128)}  # (frames, height, width) of its animated WEBP


def configured_keys() -> list[str]:
    models = json.loads(DEMO_CONFIG.read_text())["models"]
    return [entry["cache_key"] for kind in models.values() for entry in kind]


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    config = json.loads(DEMO_CONFIG.read_text())
    config["models"]["checkpoints"].append(MISSING)
    path = tmp_path_factory.mktemp("page-config") / "preload_config.json"
    path.write_text(json.dumps(config))
    server = start_server(None, config_file=path)
    # A new user's first visit opens the template browser by itself, at a moment of the page's
    # choosing; the tests open it with its button instead.
    assert server.request("POST", "/settings", {"Comfy.TutorialCompleted": True})[0] == 200
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(CHROMIUM_HINT)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server, request):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    console: list[str] = []
    errors: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: errors.append(f"{error}\n{error.stack or ''}"))
    page.goto(server.url)
    page.wait_for_function("() => window.app?.graph && document.querySelector('.memkit-cache-tab-button')",
                           timeout=120_000)
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^\w.-]+", "_", request.node.name)
        page.screenshot(path=str(ARTIFACTS / f"{stem}.png"))
        (ARTIFACTS / f"{stem}.console.txt").write_text("\n".join(console + errors))
    context.close()
    ours = [e for e in errors if "/extensions/" in e]  # errors thrown by our page code
    assert not ours, ours


# --- page helpers -------------------------------------------------------------------------------

def close_dialogs(page) -> None:
    """The template browser opens by itself on a new user's first visit; close what is open."""
    for _ in range(3):
        if page.locator(".p-dialog:visible").count() == 0:
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


def open_panel(page):
    close_dialogs(page)
    page.click(".memkit-cache-tab-button")
    page.wait_for_selector("[data-testid=memkit-entry]")
    return page.locator("[data-testid=memkit-panel]")


def row(page, key: str):
    return page.locator(f"[data-testid=memkit-entry][data-cache-key='{key}']")


def wait_state(page, key: str, states: tuple[str, ...], timeout: float = 60_000) -> str:
    page.wait_for_function(
        "([key, states]) => states.includes(document.querySelector("
        "`[data-testid=memkit-entry][data-cache-key='${key}']`)?.dataset.state)",
        arg=[key, list(states)], timeout=timeout)
    return row(page, key).get_attribute("data-state")


def toast(page, text: str):
    return page.locator(".p-toast-message", has_text=text)


def entry(server, key: str) -> dict | None:
    found = [e for e in server.get("/memkit/status")["entries"] if e["cache_key"] == key and e["state"] == "ready"]
    return found[0] if found else None


def format_gb(count: int) -> str:
    return f"{count / 2**30:.2f} GB"  # as the panel writes sizes of a gigabyte or more


def save_doc_screenshot(page, name: str) -> None:
    if REFRESH:
        DOCS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOCS / name))


def open_templates(page) -> None:
    """The template browser, on this package's category (under Extensions)."""
    if page.locator("[data-testid^=template-workflow-]").count() == 0:
        close_dialogs(page)
        page.click(".templates-tab-button")
    page.get_by_text(PACKAGE_LINK_NAME, exact=True).first.click()
    page.wait_for_selector(f"[data-testid=template-workflow-{UI_WORKFLOWS[0]}]")


def load_ui(name: str) -> dict:
    return json.loads((REPO / "workflows" / f"{name}.json").read_text())


def load_template(page, name: str, missing_models: tuple[str, ...] = ()) -> dict:
    """Load a UI workflow from the template browser; returns the file's graph. ``missing_models``:
    the files the page's missing-models dialog must list (then it is closed); else no dialog opens."""
    workflow = load_ui(name)
    open_templates(page)
    page.click(f"[data-testid=template-workflow-{name}]")
    types = sorted(node["type"] for node in workflow["nodes"])
    page.wait_for_function("types => JSON.stringify(app.graph.nodes.map(n => n.type).sort()) === JSON.stringify(types)",
                           arg=types, timeout=30_000)
    dialogs = page.locator(".p-dialog:visible")
    if missing_models:
        dialog = dialogs.filter(has_text="Missing Models")
        dialog.wait_for(timeout=30_000)
        text = dialog.inner_text()
        assert all(model in text for model in missing_models), f"{name}: the dialog lists {text[:800]}"
        page.keyboard.press("Escape")
        dialog.wait_for(state="hidden", timeout=30_000)
    page.wait_for_timeout(1000)  # a missing-node or missing-model dialog would be open by now
    assert dialogs.count() == 0, f"{name}: a dialog opened on load: {dialogs.first.inner_text()[:500]}"
    return workflow


def save_thumbnail(page, name: str) -> None:
    """The template browser's thumbnail: the graph alone (focus mode), as large as it fits a wide
    window (the canvas draws details from 60% zoom up), cropped to the nodes and groups, as a JPEG."""
    command = "id => app.extensionManager.command.execute(id)"
    page.set_viewport_size({"width": 2560, "height": 1440})
    page.evaluate(command, "Workspace.ToggleFocusMode")
    clip = page.evaluate("""() => {
        const title = LiteGraph.NODE_TITLE_HEIGHT, margin = 24;
        let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
        const boxes = [...app.graph.nodes.map(n => [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title]),
                       ...app.graph.groups.map(g => [...g._bounding])];
        for (const [x, y, w, h] of boxes) {
            x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
        }
        const scale = Math.min(1, (innerWidth - 2 * margin) / (x1 - x0), (innerHeight - 2 * margin) / (y1 - y0));
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [margin / scale - x0, margin / scale - y0];
        app.canvas.setDirty(true, true);
        return {x: 0, y: 0, width: Math.ceil((x1 - x0) * scale + 2 * margin),
                height: Math.ceil((y1 - y0) * scale + 2 * margin)};
    }""")
    page.wait_for_timeout(800)  # the page moves its DOM widgets (notes, text boxes) with the canvas
    shot = Image.open(io.BytesIO(page.screenshot(clip=clip))).convert("RGB")
    page.evaluate(command, "Workspace.ToggleFocusMode")
    page.set_viewport_size(VIEWPORT)
    shot.thumbnail((800, 600))
    shot.save(REPO / "workflows" / f"{name}.jpg", quality=85)


def check_groups(page, name: str) -> None:
    """The file's groups are on the canvas, and the page itself counts every node but the note as
    inside one (a group holds a node whose centre is in its box: moving the group moves it)."""
    workflow = load_ui(name)
    groups = page.evaluate("""() => app.graph.groups.map(g => {
        g.recomputeInsideNodes();
        return {title: g.title, bounding: [...g._bounding], nodes: [...g.nodes].map(n => n.id)};
    })""")
    assert [(g["title"], g["bounding"]) for g in groups] == [(g["title"], g["bounding"]) for g in workflow["groups"]]
    grouped = {node_id for group in groups for node_id in group["nodes"]}
    expected = {n["id"] for n in workflow["nodes"] if n["type"] not in ("Note", "MarkdownNote")}
    assert grouped == expected, f"{name}: nodes outside every group on the page: {sorted(expected - grouped)}"


def api_file(name: str) -> dict:
    return json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())


# --- the panel ----------------------------------------------------------------------------------

def test_panel_shows_the_preloaded_entries_the_budget_and_a_failed_entry_with_its_reason(page, server):
    panel = open_panel(page)
    status = server.get("/memkit/status")
    for key in configured_keys():
        assert row(page, key).get_attribute("data-state") == "ready", key
    assert row(page, "demo-sd15").get_attribute("data-pinned") == "true"
    assert row(page, "demo-missing").get_attribute("data-state") == "failed"
    reason = row(page, "demo-missing").locator("[data-testid=memkit-entry-error]").inner_text()
    assert "memkit-missing.safetensors" in reason, reason
    assert "is not a file" in reason, reason
    assert toast(page, "demo-missing").first.locator(".p-toast-detail").inner_text() == reason
    totals = status["totals"]
    assert panel.locator("[data-testid=memkit-ram-text]").inner_text() == (
        f"{format_gb(totals['ram_bytes'])} of {format_gb(totals['budget_bytes'])} budget")
    text = panel.locator("[data-testid=memkit-preload-text]")
    assert (text.get_attribute("data-phase"), text.get_attribute("data-done")) == ("done", str(len(configured_keys())
                                                                                             + 1))
    save_doc_screenshot(page, "panel.png")


def test_preload_progress_moves_entry_by_entry_and_refusals_show_as_toasts(page, server):
    open_panel(page)
    # ComfyUI's output cache holds no model yet (no workflow ran), so after a clear the models are
    # really gone and the preload really loads them: its progress must be seen between 0 and the end.
    page.click("[data-testid=memkit-clear-all]")
    for key in configured_keys():
        wait_state(page, key, ("not loaded",))
    assert server.get("/memkit/status")["totals"]["entries"] == 0
    page.evaluate("""() => {
        window.memkitProgress = [];
        const record = () => { const t = document.querySelector('[data-testid=memkit-preload-text]');
            if (t) window.memkitProgress.push([t.dataset.phase, +t.dataset.done, +t.dataset.total]); };
        new MutationObserver(record).observe(document.querySelector('[data-testid=memkit-panel]').parentElement,
                                             {childList: true, subtree: true});
    }""")
    page.click("[data-testid=memkit-preload-all]")
    # A second preload while this one runs is refused (409); the page says so.
    row(page, "demo-wan-vae").locator("[data-testid=memkit-preload-one]").click()
    toast(page, "a preload is already running").wait_for()
    page.wait_for_function("() => document.querySelector('[data-testid=memkit-preload-text]')?.dataset.phase === "
                           "'done'", timeout=180_000)
    progress = page.evaluate("() => window.memkitProgress")
    run = progress[next(i for i, (phase, _, _) in enumerate(progress) if phase != "done"):]  # this run's
    total = len(configured_keys()) + 1
    assert all(count == total for _, _, count in run), run
    done_values = [done for _, done, _ in run]
    assert any(0 < done < total for done in done_values), f"no intermediate progress seen: {progress}"
    assert done_values == sorted(done_values), f"progress went back: {progress}"
    assert done_values[-1] == total
    for key in configured_keys():
        assert row(page, key).get_attribute("data-state") == "ready", key
    # the failed entry failed again in this run: shown again, with a new toast
    assert row(page, "demo-missing").get_attribute("data-state") == "failed"
    assert toast(page, "demo-missing").count() >= 1


def test_evict_pin_and_clear_unpinned_from_the_panel(page, server):
    panel = open_panel(page)
    cached = server.get("/memkit/status")["totals"]["entries"]
    row(page, "demo-upscaler-2x").locator("[data-testid=memkit-evict]").click()
    wait_state(page, "demo-upscaler-2x", ("not loaded",))
    assert entry(server, "demo-upscaler-2x") is None
    assert panel.locator("[data-testid=memkit-totals]").inner_text().count(f"{cached - 1} cached") == 1
    # unpin one: "Clear unpinned" then takes it and leaves the pinned ones
    row(page, "demo-wan-vae").locator("[data-testid=memkit-pin]").click()
    page.wait_for_function("() => document.querySelector(\"[data-cache-key='demo-wan-vae']\").dataset.pinned "
                           "=== 'false'")
    assert entry(server, "demo-wan-vae")["pinned"] is False
    page.click("[data-testid=memkit-clear-unpinned]")
    wait_state(page, "demo-wan-vae", ("not loaded",))
    assert entry(server, "demo-sd15") is not None, "pinned entries stay"
    # and back, one by one
    for key in ("demo-upscaler-2x", "demo-wan-vae"):
        row(page, key).locator("[data-testid=memkit-preload-one]").click()
        wait_state(page, key, ("ready",))
    assert entry(server, "demo-wan-vae")["pinned"] is True, "a config entry loads pinned"
    row(page, "demo-sd15").locator("[data-testid=memkit-pin]").click()  # pin/unpin round trip
    page.wait_for_function("() => document.querySelector(\"[data-cache-key='demo-sd15']\").dataset.pinned "
                           "=== 'false'")
    row(page, "demo-sd15").locator("[data-testid=memkit-pin]").click()
    page.wait_for_function("() => document.querySelector(\"[data-cache-key='demo-sd15']\").dataset.pinned "
                           "=== 'true'")
    assert entry(server, "demo-sd15")["pinned"] is True


# --- the workflows ------------------------------------------------------------------------------

def ensure_demo_entries_ready(server) -> None:
    """The panel tests evict and reload entries; one that failed must not fail the workflows too."""
    ready = {e["cache_key"] for e in server.get("/memkit/status")["entries"] if e["state"] == "ready"}
    if not set(configured_keys()) <= ready:
        assert server.request("POST", "/memkit/preload", {"wait": True})[0] == 200


@pytest.mark.parametrize("name", RUN)
def test_ui_workflow_from_the_template_browser_runs(page, server, name):
    ensure_demo_entries_ready(server)
    load_template(page, name)
    check_groups(page, name)
    if name == "memkit_sd15_cached_loader":
        save_doc_screenshot(page, "workflow.png")  # as loaded: the view the file restores, with its groups
    if REFRESH:
        save_thumbnail(page, name)
    loads_before = server.get("/memkit/status")["totals"]["loads"]
    with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as answer:
        page.click("[data-testid=queue-button]")
    assert answer.value.status == 200, answer.value.text()
    queued = answer.value.request.post_data_json["prompt"]
    assert queued == api_file(name), f"the page queues what workflows/api/{name}.json holds"
    outputs = server.wait_for(answer.value.json()["prompt_id"], timeout=600)
    if name == "memkit_cache_info":
        table, by_key, by_file = ("\n".join(outputs[node]["text"]) for node in ("1", "2", "3"))
        assert all(key in table for key in configured_keys()), table
        assert by_key.startswith("demo-sd15: checkpoint,")
        assert by_file.startswith("demo-sd-vae: vae,")
        page.wait_for_function("text => [...document.querySelectorAll('[data-testid=memkit-node-text]')]"
                               ".some(box => box.value.startsWith(text))", arg="demo-sd15: checkpoint,",
                               timeout=10_000)  # the status shows on its node
    elif name in ANIMATIONS:  # one animated WEBP: every frame of the size, finite, not flat
        saved = [(image, output.get("animated")) for output in outputs.values() for image in output.get("images", [])]
        assert len(saved) == 1, saved
        assert saved[0][0]["filename"].endswith(".webp"), saved
        assert saved[0][1] == [True], saved
        frames, height, width = ANIMATIONS[name]
        with Image.open(server.output_file(saved[0][0])) as animation:
            assert animation.format == "WEBP"
            assert animation.is_animated
            assert animation.n_frames == frames
            for index in range(frames):
                animation.seek(index)
                pixels = np.asarray(animation.convert("RGB"), dtype=np.float32)
                assert pixels.shape == (height, width, 3)
                assert np.isfinite(pixels).all()
                assert pixels.std() > 0, f"frame {index} is flat"
    else:
        images = [image for output in outputs.values() for image in output.get("images", [])]
        assert images, f"{name} saved no image"
        for image in images:
            pixels = np.asarray(Image.open(server.output_file(image)), dtype=np.float32)
            assert pixels.shape == (256, 256, 3)
            assert np.isfinite(pixels).all()
            assert pixels.std() > 0
    assert server.get("/memkit/status")["totals"]["loads"] == loads_before, "the demo models were preloaded"
    assert page.locator(".p-dialog:visible").count() == 0, "no error dialog"
    after = json.loads(page.evaluate("async () => JSON.stringify(await app.graphToPrompt())"))
    assert after["output"] == queued, "what the page shows after a run is never saved nor sent"
    values = {n["id"]: n.get("widgets_values") or [] for n in after["workflow"]["nodes"]}
    assert values == {n["id"]: n.get("widgets_values") or [] for n in load_ui(name)["nodes"]}


def test_wan_ui_workflow_offers_its_real_model_files_and_exports_as_its_api_file(page, server):
    """It names the real Wan 2.1 files, which `make run` does not have: the page's missing-models
    dialog lists them on load (they are declared in the nodes' ``properties.models`` with their
    download addresses), instead of a FileNotFoundError at run time. Exported by the page exactly
    as workflows/api/ has it. Not queued here: test_video_caches_server.py runs its API file
    with stand-ins through /prompt."""
    name = "memkit_wan21_t2v"
    load_template(page, name, missing_models=("wan2.1_t2v_1.3B_fp16.safetensors",
                                              "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan_2.1_vae.safetensors"))
    check_groups(page, name)
    if REFRESH:
        save_thumbnail(page, name)
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert prompt == api_file(name)


def test_template_browser_lists_every_ui_workflow_with_its_thumbnail(page, server):
    open_templates(page)
    for name in UI_WORKFLOWS:
        image = page.locator(f"[data-testid=template-workflow-{name}] img").first
        image.wait_for()
        # the page fetches /api/workflow_templates/<package>/<name>.jpg (falling back to its default
        # picture when that fails): the card shows our file when it has that file's size
        size = Image.open(REPO / "workflows" / f"{name}.jpg").size
        page.wait_for_function("([img, w, h]) => img.complete && img.naturalWidth === w && img.naturalHeight === h",
                               arg=[image.element_handle(), *size], timeout=10_000)
        assert "default-template" not in image.get_attribute("src")
    assert page.locator("[data-testid^=template-workflow-]").count() == len(UI_WORKFLOWS)
    time.sleep(0.5)
    save_doc_screenshot(page, "templates.png")


def test_every_node_has_its_help_page_where_the_pages_node_help_panel_reads_it(server):
    """The frontend's node help panel fetches /extensions/<package>/docs/<node id>.md (web/docs/)."""
    ids = [name for name, info in server.get("/object_info").items()
           if info.get("python_module") == f"custom_nodes.{PACKAGE_LINK_NAME}"]  # not the test node pack's
    assert len(ids) >= 17, ids
    for node in ids:
        status, text = server.request("GET", f"/extensions/{PACKAGE_LINK_NAME}/docs/{node}.md")
        assert status == 200, node
        assert text == (REPO / "web" / "docs" / f"{node}.md").read_text(encoding="utf-8"), node


def test_the_export_script_on_this_page_writes_the_committed_api_files(page):
    """scripts/export_workflows.py's own export (app.loadGraphData, then graphToPrompt's output) of
    every UI workflow is byte for byte its file in workflows/api/ (the tests above check that the
    page queues that file's prompt from the template browser)."""
    assert export_workflows.export_all(lambda graph: export_workflows.page_export(page, graph), check=True) == []


def test_template_thumbnails_are_served_where_comfyui_serves_only_the_json(server):
    """ComfyUI 0.38 serves a template's .json only; MemKit's own route serves the .jpg (on 0.3.75 the
    path without /api is MemKit's alone: ComfyUI's static route is under /api). Only plain names."""
    base = f"{server.url}/workflow_templates/{PACKAGE_LINK_NAME}"
    for name in UI_WORKFLOWS:
        with urllib.request.urlopen(f"{base}/{name}.jpg", timeout=60) as answer:
            assert answer.read() == (REPO / "workflows" / f"{name}.jpg").read_bytes(), name
    for bad in ("nothing-here", "..%2Fpyproject", "%2E%2E%2F__init__", "api%2Fmemkit_cache_info"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/{bad}.jpg", timeout=60)
        assert refused.value.code == 404, bad
