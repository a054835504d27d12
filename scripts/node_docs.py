#!/usr/bin/env python3
"""Write each node's help page, ``web/docs/<node id>.md``, from ``docs/nodes.md``.

ComfyUI's page shows a custom node's documentation in its node help panel when the package's web
folder has ``docs/<node id>.md`` (frontend 1.32 and later: it fetches
``/extensions/<package>/docs/<node id>.md``). ``docs/nodes.md`` stays the one place the nodes are
described; the help pages are cut from it (the node's row of the table, the sections about it) so
that the two never disagree. Links become absolute (the panel is not in the repository).

Usage::

    python scripts/node_docs.py [--check]

``--check`` writes nothing and exits 1 when a page is not what ``docs/nodes.md`` makes.
Standard library only.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "docs" / "nodes.md"
OUT = REPO / "web" / "docs"
BLOB = "https://github.com/comfyui-memkit/comfyui-memkit/blob/main/"
LOADERS = ("MemKitCheckpointLoader", "MemKitTextEncoderLoader", "MemKitDiffusionModelLoader", "MemKitVAELoader")
SELECTORS = ("MemKitCheckpointSelector", "MemKitTextEncoderSelector", "MemKitDiffusionModelSelector",
             "MemKitVAESelector")
# the sections of docs/nodes.md that belong on a node's page, besides its row of the table
SECTIONS = {
    **{node: ["The nodes"] for node in LOADERS + SELECTORS},
    "MemKitDiffusionModelLoader": ["The nodes", "Attention mode"],
    "MemKitCachedNode": ["Any loader node"],
    "MemKitTiledVAEDecode": ["Tiled VAE decode"],
    "MemKitStepCache": ["Step cache"],
}
NAMED = r"`(MemKit\w+)` \(((?:[^()]|\([^()]*\))*)\)"  # `id` (display name (with one level of brackets))
ROW = re.compile(rf"^\| (?P<nodes>{NAMED}(?:, {NAMED})*) \| (?P<inputs>.*) \| (?P<outputs>.*) \|$")
HEADINGS = {"The nodes": "Loaders and selectors"}
LINK = re.compile(r"\]\((?!https?://)(?P<target>[^)]*)\)")

log = logging.getLogger("memkit.node_docs")


def _absolute(text: str) -> str:
    """Relative links of docs/nodes.md as links to the repository's pages."""
    def fix(match: re.Match) -> str:
        target = match["target"]
        if target.startswith("#"):
            return f"]({BLOB}docs/nodes.md{target})"
        return f"]({BLOB}{(Path('docs') / target).as_posix().replace('docs/../', '')})"

    return LINK.sub(fix, text)


def _sections(text: str) -> dict[str, str]:
    """The ``##`` sections of docs/nodes.md by title; "The nodes" without its table."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    found = {title.strip(): body.strip() for title, body in zip(parts[1::2], parts[2::2])}
    if "The nodes" in found:
        found["The nodes"] = "\n".join(line for line in found["The nodes"].splitlines()
                                       if not line.startswith("|") and "public contract" not in line).strip()
    return found


def pages(text: str) -> dict[str, str]:
    """Node id → its help page."""
    sections = _sections(text)
    made = {}
    for line in text.splitlines():
        row = ROW.match(line)
        if row is None:
            continue
        for node, name in re.findall(NAMED, row["nodes"]):
            body = [f"# {name}", "", f"Node id `{node}` (comfyui-memkit).", "",
                    f"**Inputs:** {row['inputs']}", "", f"**Outputs:** {row['outputs']}"]
            for title in SECTIONS.get(node, []):
                body += ["", f"## {HEADINGS.get(title, title)}", "", sections[title]]
            body += ["", f"*From [docs/nodes.md]({BLOB}docs/nodes.md), made by scripts/node_docs.py.*"]
            made[node] = _absolute("\n".join(body)) + "\n"
    return made


def write_all(check: bool = False, out: Path = OUT) -> list[str]:
    """Write the pages (or, with ``check``, only compare); returns the names that differ or are extra."""
    made = pages(SOURCE.read_text(encoding="utf-8"))
    differ = []
    for node, page in made.items():
        path = out / f"{node}.md"
        if not path.is_file() or path.read_text(encoding="utf-8") != page:
            differ.append(path.name)
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(page, encoding="utf-8")
    for extra in sorted(out.glob("*.md")):
        if extra.stem not in made:
            differ.append(extra.name)
            if not check:
                extra.unlink()
    return differ


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; fail if a page is out of date")
    args = parser.parse_args()
    differ = write_all(check=args.check)
    for name in differ:
        log.info("%s web/docs/%s", "out of date:" if args.check else "wrote", name)
    return 1 if args.check and differ else 0


if __name__ == "__main__":
    sys.exit(main())
