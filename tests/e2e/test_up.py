"""``draftflow up`` as a user runs it: interrupted with Ctrl-C part-way, then run again to the end.

The second run continues the first one's run (same database, same checkpoints) and ends with the
summary, the acceptance figures and an exported draft.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.cluster import CHILD_ENV, DATASET, ROOT, descendants, wait_for

pytestmark = pytest.mark.slow

PROMPTS, EPOCHS, MICRO = 24, 2, 4
STEPS = PROMPTS * EPOCHS // MICRO


def write_config(tmp_path: Path, target: Path, high_samples: int = 8, ttt_length: int = 2
                 ) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(DATASET.read_text().splitlines()[:PROMPTS]) + "\n")
    cfg = {
        "run_id": "up-e2e", "dataset": str(data), "epochs": EPOCHS,
        "target": {"model_path": str(target), "revision": "e2e"},
        "capture": {"max_length": 128},
        "draft": {"draft_vocab_size": 128, "ttt_length": ttt_length},
        "step": {"world_size": 1, "micro_batch": MICRO, "accumulation": 1},
        "training": {"learning_rate": 1e-3, "checkpoint_every": 2},
        "lease": {"lease_seconds": 10, "heartbeat_seconds": 1},
        # A low watermark keeps the run going long enough to be interrupted part-way.
        "watermark": {"high_samples": high_samples, "low_samples": high_samples // 2,
                      "retry_after_seconds": 0.2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def up(config: Path, workdir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "draftflow", "up", "--config", str(config), "--workdir",
         str(workdir), "--timeout", "300"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **CHILD_ENV, "COLUMNS": "160"})


def committed_step(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=1) as conn:
            row = conn.execute("SELECT last_committed_step FROM runs").fetchone()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def test_up_interrupted_then_continued_to_an_exported_draft(tmp_path: Path,
                                                            tiny_target: Path) -> None:
    config = write_config(tmp_path, tiny_target)
    work = tmp_path / "work"
    first = up(config, work)
    children: set[int] = set()
    try:
        def training() -> bool:
            children.update(descendants(first.pid))
            return first.poll() is not None or committed_step(work / "coordinator.db") >= 2
        wait_for(training, 180, "the first steps of draftflow up")
        assert first.poll() is None, first.communicate()[0]
        first.send_signal(signal.SIGINT)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, out
    assert "interrupted: stopping every process" in out
    # Every process it started is gone.
    time.sleep(0.5)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()]
    assert alive == [], alive
    interrupted_at = committed_step(work / "coordinator.db")
    assert 2 <= interrupted_at < STEPS

    second = up(config, work)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    assert "draftflow up — done" in out
    assert f"{PROMPTS * EPOCHS} trained, 0 dropped" in out
    for figure in ("top-1 accuracy", "acceptance length", "chance", "baseline"):
        assert figure in out, out
    final = work / "runs" / "up-e2e" / "final"
    assert str(final) in out
    assert (final / "config.json").is_file()
    assert any(final.glob("*.safetensors"))

    summary = json.loads((work / "runs" / "up-e2e" / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert summary["samples"].get("LOST", 0) == summary["samples"].get("DEAD", 0) == 0
    assert summary["trainer"]["steps_seen"] > 0
    assert summary["chance_accuracy"] == pytest.approx(1 / 128)
    assert len(summary["trainer"]["accuracies"]) == 2
    assert 0 < summary["trainer"]["majority_accuracy"] <= 1


def test_up_killed_after_capture_then_run_again(tmp_path: Path, tiny_target: Path) -> None:
    """A crash of the whole tree once everything is captured: the features in flight die with
    Mooncake, so the next ``up`` must capture some prompts again after its producers found
    nothing to do, and still finish with every sample trained once."""
    # No watermark to speak of and a longer unroll to train: capture ends well before training.
    config = write_config(tmp_path, tiny_target, high_samples=PROMPTS * EPOCHS, ttt_length=6)
    work = tmp_path / "work"
    db = work / "coordinator.db"
    first = up(config, work)
    try:
        def captured() -> bool:
            if first.poll() is not None or not db.exists():
                return first.poll() is not None
            try:
                with sqlite3.connect(db, timeout=1) as conn:
                    (done,) = conn.execute(
                        "SELECT COUNT(*) FROM samples WHERE prompt_state = 'CAPTURED'").fetchone()
            except sqlite3.Error:  # not created yet
                return False
            return done == PROMPTS * EPOCHS
        wait_for(captured, 180, "capture to finish")
        assert first.poll() is None, first.communicate()[0]
        for pid in [first.pid, *descendants(first.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert committed_step(db) < STEPS

    second = up(config, work)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    assert f"{PROMPTS * EPOCHS} trained, 0 dropped (end-of-data tail), 0 dead, 0 lost" in out
    summary = json.loads((work / "runs" / "up-e2e" / "summary.json").read_text())
    assert summary["steps"] == STEPS
