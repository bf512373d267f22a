"""Project-wide invariants: generated code is fresh, roles do not import each other, lint."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("coordinator", "producer", "trainer")


def test_generated_protobuf_code_is_fresh() -> None:
    out = subprocess.run([sys.executable, "scripts/gen_proto.py", "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("role", ROLES)
def test_roles_do_not_import_each_other(role: str) -> None:
    others = set(ROLES) - {role}
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & others)
        for p in (ROOT / role).rglob("*.py")
        if _imports(p) & others
    }
    assert offenders == {}


def test_services_import_no_role() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & set(ROLES))
        for p in (ROOT / "services").rglob("*.py")
        if _imports(p) & set(ROLES)
    }
    assert offenders == {}


def test_ruff_is_clean() -> None:
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
