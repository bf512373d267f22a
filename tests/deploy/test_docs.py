"""The deployment docs point at things that exist and name the ports compose.yaml publishes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "docs/multinode.md", ROOT / "docs/architecture.md"]
_LINK = re.compile(r"\]\(([^)#]+)(#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    targets = [m.group(1) for m in _LINK.finditer(doc.read_text())]
    broken = [t for t in targets if "://" not in t and not (doc.parent / t).exists()]
    assert not broken, f"{doc.name} links to missing files: {broken}"


def test_anchors_into_multinode_exist() -> None:
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in (ROOT / "docs/multinode.md").read_text().splitlines() if line.startswith("#")
    }
    anchors = re.findall(r"multinode\.md#([a-z0-9-]+)", (ROOT / "docs/architecture.md").read_text())
    assert anchors and set(anchors) <= headings


def test_every_port_in_compose_is_in_the_port_table() -> None:
    text = (ROOT / "compose.yaml").read_text()
    ports = {int(p) for p in re.findall(r"\}:(\d+):\1", text)}
    table = (ROOT / "docs/multinode.md").read_text().split("## Ports", 1)[1].split("\n## ", 1)[0]
    listed = {int(p) for p in re.findall(r"\b(\d{4,5})\b", table)}
    assert ports and ports <= listed, f"ports missing from the table: {sorted(ports - listed)}"


def test_example_commands_use_the_documented_run_ids() -> None:
    guide = (ROOT / "docs/multinode.md").read_text()
    for name in ("llama-3.1-8b.yaml",):
        run_id = yaml.safe_load((ROOT / "examples" / name).read_text())["run_id"]
        assert f"examples/{name}" in guide
        assert f"DRAFTFLOW_RUN={run_id}" in guide
