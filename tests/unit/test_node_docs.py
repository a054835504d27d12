"""web/docs/<node id>.md: the page's node help panel, cut from docs/nodes.md by scripts/node_docs.py."""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import node_docs  # noqa: E402


def registered_node_ids() -> set[str]:
    """Every node id the package registers (the V3 schemas' node_id, the selectors' factory calls)."""
    ids = set()
    for source in (REPO / "nodes").glob("*.py"):
        text = source.read_text(encoding="utf-8")
        ids |= set(re.findall(r'node_id="(MemKit\w+)"', text))
        ids |= set(re.findall(r'ModelKind\.\w+, "(MemKit\w+)"', text))
    return ids


def test_every_node_has_a_help_page_made_from_docs_nodes_md():
    ids = registered_node_ids()
    assert len(ids) >= 17
    assert ids == {page.stem for page in node_docs.OUT.glob("*.md")}
    assert node_docs.write_all(check=True) == [], "run: python scripts/node_docs.py"


def test_a_page_carries_the_nodes_row_and_its_sections_with_absolute_links():
    pages = node_docs.pages(node_docs.SOURCE.read_text(encoding="utf-8"))
    page = pages["MemKitDiffusionModelLoader"]
    assert page.startswith("# Load Diffusion Model (MemKit cached)\n")
    assert "**Inputs:** `unet_name`" in page
    assert "## Attention mode" in page
    assert "## Loaders and selectors" in page
    assert re.search(r"\]\((?!https://)", page) is None, "relative links do not work in the page's panel"
    assert pages["MemKitVAESelector"].startswith("# Preloaded VAE (MemKit)\n")


def test_the_check_finds_a_stale_page_and_an_extra_one(tmp_path):
    node_docs.write_all(out=tmp_path)
    assert node_docs.write_all(check=True, out=tmp_path) == []
    (tmp_path / "MemKitVAELoader.md").write_text("old\n")
    (tmp_path / "MemKitGone.md").write_text("gone\n")
    assert node_docs.write_all(check=True, out=tmp_path) == ["MemKitVAELoader.md", "MemKitGone.md"]
