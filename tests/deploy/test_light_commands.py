"""The commands people and healthchecks run often import no torch, against a real coordinator.

Each command runs in a fresh interpreter (``sys.modules`` of this test process holds torch
already) through ``draftflow.cli.main``, as the ``draftflow`` script calls it; the coordinator
requires a token, which the commands read from ``DRAFTFLOW_TOKEN_FILE``.
``draftflow run create`` is not among them: it reads the target's tokenizer (transformers),
which imports torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.e2e.cluster import DATASET, ROOT

TOKEN = "light-s3cret"
HEAVY = ("torch", "transformers", "numpy", "safetensors")
_PROBE = f"""
import json, sys
from draftflow.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
print("LIGHT " + json.dumps({{"code": code, "heavy": heavy}}))
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_target: Path) -> Iterator[str]:
    """HOST:PORT of a coordinator requiring ``TOKEN``, holding run ``light``."""
    from coordinator.server import CoordinatorConfig, CoordinatorProcess
    from draftflow.run_cli import create_run, create_run_request
    from services.api import coordinator_pb2_grpc
    from services.rpc.client import open_channel
    from services.rpc.server import ServerConfig

    tmp = tmp_path_factory.mktemp("light")
    data = tmp / "data.jsonl"
    data.write_text("\n".join(DATASET.read_text().splitlines()[:8]) + "\n")
    config = tmp / "light.yaml"
    config.write_text(yaml.safe_dump({
        "run_id": "light", "dataset": data.name, "epochs": 1,
        "target": {"model_path": str(tiny_target)},
        "draft": {"draft_vocab_size": 64, "ttt_length": 2},
        "step": {"world_size": 1, "micro_batch": 2, "accumulation": 1},
    }))
    proc = CoordinatorProcess(CoordinatorConfig(
        db_url=f"sqlite:///{tmp / 'coordinator.db'}",
        server=ServerConfig(listen="127.0.0.1:0", auth_token=TOKEN)))
    address = f"127.0.0.1:{proc.port}"
    with open_channel(address, token=TOKEN) as channel:
        create_run(coordinator_pb2_grpc.CoordinatorServiceStub(channel),
                   create_run_request(config))
    yield address
    proc.stop(grace=0.5)


def _token_env(tmp_path: Path) -> dict[str, str]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRAFTFLOW_")}
    env["DRAFTFLOW_TOKEN_FILE"] = str(token_file)
    return env


def _run(argv: list[str], env: dict[str, str]) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("LIGHT ")]
    assert lines, f"{argv}: no report\n{done.stdout}\n{done.stderr}"
    return json.loads(lines[-1][len("LIGHT "):]), done.stdout + done.stderr


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["health", "{addr}"],
    ["status", "light", "--coordinator", "{addr}"],
    ["status", "light", "--json", "--coordinator", "{addr}"],
    ["run", "list", "--coordinator", "{addr}"],
    ["run", "get", "light", "--coordinator", "{addr}"],
    ["run", "create", "--help"],
    ["up", "--help"],
], ids=lambda a: " ".join(a).replace("{addr}", "ADDR"))
def test_command_imports_no_torch(argv: list[str], served: str, tmp_path: Path) -> None:
    report, output = _run([a.replace("{addr}", served) for a in argv], _token_env(tmp_path))
    assert report["code"] in (0, None), output
    assert report["heavy"] == [], output


def test_status_authenticates_with_the_token_file(served: str, tmp_path: Path) -> None:
    env = _token_env(tmp_path)
    report, output = _run(["status", "light", "--json", "--coordinator", served], env)
    assert report["code"] == 0, output
    assert '"run_id": "light"' in output
    (tmp_path / "token").write_text("wrong\n")
    report, output = _run(["status", "light", "--coordinator", served], env)
    assert report["code"] == 1
    assert "UNAUTHENTICATED" in output


def test_health_answers_quickly(served: str) -> None:
    """The compose healthcheck: the whole command, interpreter start included."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "draftflow", "health", served], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    # Well under a second on an idle 2-core machine; the bound leaves room for a busy one and
    # stays far below compose's 15 s healthcheck timeout.
    assert elapsed < 5.0, f"draftflow health took {elapsed:.1f} s"
