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


_COMPOSE_SERVICE_USES = re.compile(
    r"docker compose (?:exec (?:-T )?|cp |logs |restart |up -d --build (?:[a-z-]+ )*)([a-z-]+)")


@pytest.mark.parametrize("doc", [ROOT / "README.md", ROOT / "docs/multinode.md"],
                         ids=lambda p: p.name)
def test_compose_commands_name_services_that_exist(doc: Path) -> None:
    services = set(yaml.safe_load((ROOT / "compose.yaml").read_text())["services"])
    text = doc.read_text()
    named = set(_COMPOSE_SERVICE_USES.findall(text))
    named |= {m for group in re.findall(r"docker compose up -d --build ([a-z -]+)", text)
              for m in group.split()}
    assert named, f"{doc.name} shows no compose command naming a service"
    assert named <= services, f"{doc.name} names services compose.yaml lacks: {named - services}"


def test_docs_show_the_command_that_prints_the_token() -> None:
    command = "docker compose exec -T coordinator cat /run/draftflow/token"
    for doc in (ROOT / "README.md", ROOT / "docs/multinode.md"):
        assert command in doc.read_text(), doc.name
    token_service = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["token"]
    assert token_service["command"][-1] == "/run/draftflow/token"
