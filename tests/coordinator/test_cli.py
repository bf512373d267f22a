"""The coordinator commands as people run them: real processes, real sockets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from services.store.mooncake_proc import free_port, free_ports

ROOT = Path(__file__).resolve().parents[2]


def draftflow(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "draftflow", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[tuple[str, int, subprocess.Popen[str]]]:
    port, mport = free_ports(2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "draftflow", "coordinator", "--listen", f"127.0.0.1:{port}",
         "--db", f"sqlite:///{tmp_path / 'c.db'}", "--metrics-port", str(mport)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    while "coordinator listening on port" not in line:
        assert line, "coordinator exited during start-up"
        line = proc.stdout.readline()
    yield f"127.0.0.1:{port}", mport, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def write_config(tmp_path: Path, target: Path, **extra: object) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"conversations": [
        {"from": "human", "value": f"what is {i} plus {i}?"},
        {"from": "gpt", "value": f"{i} plus {i} is {2 * i}."}]}) for i in range(12))
        + "\nnot json\n")
    cfg = {"run_id": "cli", "dataset": str(data), "epochs": 2,
           "target": {"model_path": str(target), "revision": "t0"},
           "draft": {"draft_vocab_size": 64, "ttt_length": 2}, **extra}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_create_status_list_cancel_and_sigterm(
        coordinator: tuple[str, int, subprocess.Popen[str]], tiny_target: Path,
        tmp_path: Path) -> None:
    target, mport, proc = coordinator
    config = write_config(tmp_path, tiny_target)
    out = draftflow("run", "create", str(config), "--coordinator", target)
    assert out.returncode == 0, out.stderr
    assert "run cli: 12 prompts x 2 epochs" in out.stdout
    assert "skipped line 13: not valid JSON" in out.stdout
    again = draftflow("run", "create", str(config), "--coordinator", target)
    assert again.returncode == 0 and again.stdout.splitlines()[0] == out.stdout.splitlines()[0]

    status = draftflow("status", "cli", "--json", "--coordinator", target)
    assert json.loads(status.stdout)["prompts"]["PENDING"] == "24"
    people = draftflow("status", "cli", "--coordinator", target)
    assert "PENDING 24" in people.stdout and "0 / 24 committed" in people.stdout
    listed = draftflow("run", "list", "--coordinator", target)
    assert listed.stdout.startswith("cli\tRUN_STATE_ACTIVE\t12 prompts")

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics").read().decode()
    assert 'draftflow_prompts{run_id="cli",state="PENDING"} 24.0' in metrics
    assert 'draftflow_rpc_total{code="OK",method="CreateRunStream"}' in metrics

    missing = draftflow("status", "nope", "--coordinator", target)
    assert missing.returncode == 1
    assert "NOT_FOUND: run 'nope' does not exist" in missing.stderr
    cancelled = draftflow("run", "cancel", "cli", "--coordinator", target)
    assert cancelled.stdout.strip() == "run cli: RUN_STATE_CANCELLED"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def test_bad_config_says_which_field(tmp_path: Path, tiny_target: Path) -> None:
    config = write_config(tmp_path, tiny_target, epochs=0, lease={"lease_secs": 3})
    out = draftflow("run", "create", str(config), "--coordinator", "127.0.0.1:1")
    assert out.returncode == 2
    assert "epochs: Input should be greater than 0" in out.stderr
    assert "lease.lease_secs: Extra inputs are not permitted" in out.stderr


def test_unreachable_coordinator_says_what_to_do(tmp_path: Path, tiny_target: Path) -> None:
    start = time.monotonic()
    out = draftflow("status", "x", "--coordinator", f"127.0.0.1:{free_port()}")
    assert out.returncode == 1
    assert "UNAVAILABLE" in out.stderr and "is the coordinator running?" in out.stderr
    assert time.monotonic() - start < 60
