"""``draftflow train`` (colocated) as a user runs it, against ``draftflow up`` and against itself.

Per-step losses are compared bit for bit: the coordinator's committed loss of every step (its
``steps`` table, the same column both commands fill) and the losses ``draftflow train`` writes to
``colocated.json``. A kill -9 part-way, then the same command again, must end with the same
exported weights, bit for bit, as a run never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.e2e.cluster import CHILD_ENV, DATASET, ROOT, wait_for
from tests.e2e.test_up import committed_step

pytestmark = pytest.mark.slow

PROMPTS, EPOCHS, MICRO = 24, 2, 4
STEPS = PROMPTS * EPOCHS // MICRO


def write_config(tmp_path: Path, target: Path) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(DATASET.read_text().splitlines()[:PROMPTS]) + "\n")
    cfg = {
        "run_id": "colocated", "dataset": str(data), "epochs": EPOCHS,
        "target": {"model_path": str(target), "revision": "e2e"},
        "capture": {"max_length": 128},
        "draft": {"draft_vocab_size": 128, "ttt_length": 2},
        "step": {"world_size": 1, "micro_batch": MICRO, "accumulation": 1},
        "training": {"learning_rate": 1e-3, "checkpoint_every": 2, "seed": 3},
        "lease": {"lease_seconds": 10, "heartbeat_seconds": 1},
        # A low watermark keeps capture a few steps ahead, so a kill finds work in flight.
        "watermark": {"high_samples": 8, "low_samples": 4, "retry_after_seconds": 0.2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "draftflow", *args]


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(command(*args), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **CHILD_ENV, "COLUMNS": "160"})


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    return out


def train(config: Path, work: Path, *flags: str) -> str:
    return finish(start("train", str(config), "--workdir", str(work), "--no-progress", *flags))


def step_losses(db: Path) -> list[tuple[int, float]]:
    with sqlite3.connect(db) as conn:
        return [(int(s), float(loss)) for s, loss in conn.execute(
            "SELECT step, loss FROM steps WHERE committed_at IS NOT NULL ORDER BY step")]


def own_losses(work: Path) -> list[tuple[int, float]]:
    doc = json.loads((work / "runs" / "colocated" / "colocated.json").read_text())
    return [(int(s), float(loss)) for s, loss in doc["losses"]]


def final_weights(work: Path) -> dict:
    final = work / "runs" / "colocated" / "final"
    tensors: dict = {}
    for path in sorted(final.glob("*.safetensors")):
        tensors.update(load_file(path))
    assert tensors, f"no exported weights in {final}"
    return tensors


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not (a[name].dtype == b[name].dtype
                                            and a[name].shape == b[name].shape
                                            and a[name].view(-1).eq(b[name].view(-1)).all())]
    assert different == []


def test_train_losses_equal_up_and_no_control_plane(tmp_path: Path, tiny_target: Path) -> None:
    config = write_config(tmp_path, tiny_target)

    out = train(config, tmp_path / "train")
    assert "draftflow train — done" in out
    assert f"{PROMPTS * EPOCHS} trained, 0 dropped" in out
    assert "memory: target" in out
    colocated = step_losses(tmp_path / "train" / "coordinator.db")
    assert [s for s, _ in colocated] == list(range(1, STEPS + 1))
    assert own_losses(tmp_path / "train") == colocated

    out = train(config, tmp_path / "bare", "--no-control-plane")
    assert "no control plane" in out and "cannot resume" in out
    assert not (tmp_path / "bare" / "coordinator.db").exists()
    assert own_losses(tmp_path / "bare") == colocated
    assert_same_weights(final_weights(tmp_path / "bare"), final_weights(tmp_path / "train"))

    up = finish(start("up", "--config", str(config), "--workdir", str(tmp_path / "up"),
                      "--timeout", "300"))
    assert "draftflow up — done" in up
    assert step_losses(tmp_path / "up" / "coordinator.db") == colocated
    assert_same_weights(final_weights(tmp_path / "up"), final_weights(tmp_path / "train"))


def test_train_killed_then_run_again_ends_with_the_same_weights(tmp_path: Path,
                                                                 tiny_target: Path) -> None:
    # One prompt per capture: a prompt recaptured after the kill is padded exactly as the
    # first time, so its hidden states are the same to the bit.
    config = write_config(tmp_path, tiny_target)
    flags = ("--capture-batch", "1")
    train(config, tmp_path / "whole", *flags)
    whole = final_weights(tmp_path / "whole")

    work = tmp_path / "killed"
    db = work / "coordinator.db"
    first = start("train", str(config), "--workdir", str(work), "--no-progress", *flags)
    try:
        # Past the first checkpoint (step 2) and short of the end.
        wait_for(lambda: first.poll() is not None or committed_step(db) >= 3, 180,
                 "draftflow train to commit step 3")
        assert first.poll() is None, first.communicate()[0]
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    killed_at = committed_step(db)
    assert 3 <= killed_at < STEPS

    out = train(config, work, *flags)
    assert f"{PROMPTS * EPOCHS} trained" in out
    assert step_losses(db)[-1][0] == STEPS
    assert_same_weights(final_weights(work), whole)
