"""Colocated against disaggregated: ``draftflow train`` and ``draftflow up`` on one config, one run.

Runs ``draftflow up`` (coordinator, Mooncake master and holder, a producer and a trainer, each its
own process) and then ``draftflow train`` (everything in one process, features in memory) on the
same run config, each from scratch in its own work directory, and prints per command:

- **samples/s (trainer)**: samples trained per second since the trainer started training, as the
  trainer reports it (``summary.json``);
- **samples/s (wall)**: samples trained over the command's whole wall time (start-up included);
- **waits for capture**: the share of the trainer's time spent waiting for the next step's
  features (the overlap figure: 0 means capture always kept ahead of training);

and the ratios train / up.

    .venv/bin/python bench/bench_colocated.py [--config examples/tiny.yaml] [--device cpu]
    .venv/bin/python bench/bench_colocated.py --quick     # a small generated run, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402


def quick_config(work: Path, prompts: int = 48, epochs: int = 2) -> Path:
    """A small run on a tiny untrained target (built here, no download)."""
    from services.tiny_model import build_tiny_target

    target = build_tiny_target(work / "target", num_layers=8, hidden_size=64)
    data = work / "data.jsonl"
    lines = (ROOT / "examples" / "data" / "conversations.jsonl").read_text().splitlines()
    data.write_text("\n".join(lines[:prompts]) + "\n")
    cfg = {
        "run_id": "bench-colocated", "dataset": str(data), "epochs": epochs,
        "target": {"model_path": str(target), "revision": "bench"},
        "capture": {"max_length": 256},
        "draft": {"draft_vocab_size": 256, "ttt_length": 3},
        "step": {"world_size": 1, "micro_batch": 4, "accumulation": 1},
        "training": {"learning_rate": 1e-3, "checkpoint_every": 50},
        "lease": {"lease_seconds": 30, "heartbeat_seconds": 2},
        "watermark": {"high_samples": 64, "low_samples": 32},
    }
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(args: list[str], run_dir_of: Path) -> dict:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "draftflow", *args], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "160"})
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"draftflow {args[0]} failed:\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    summaries = list(run_dir_of.glob("runs/*/summary.json"))
    summary = json.loads(summaries[0].read_text())
    samples = summary["samples"]
    trained = samples.get("TRAINED", 0) + samples.get("RETIRED", 0)
    return {"wall_s": wall, "trained": trained, "wall_rate": trained / wall,
            "trainer_rate": summary["trainer"]["samples_per_second"],
            "wait": summary["trainer"]["data_wait_fraction"], "loss": summary["final_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "tiny.yaml")
    parser.add_argument("--quick", action="store_true", help="a small generated run instead")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-colocated-") as tmp:
        work = Path(tmp)
        config = quick_config(work) if args.quick else args.config.resolve()
        up = run(["up", "--config", str(config), "--workdir", str(work / "up"), "--fresh",
                  "--device", args.device], work / "up")
        train = run(["train", str(config), "--workdir", str(work / "train"), "--fresh",
                     "--device", args.device, "--no-progress"], work / "train")
    print(f"config: {config if not args.quick else 'quick (generated)'}, device {args.device}, "
          f"{os.cpu_count()} cores")
    print(f"{'':16}{'samples':>8}{'wall s':>9}{'samples/s wall':>16}"
          f"{'samples/s trainer':>19}{'waits for capture':>19}{'final loss':>12}")
    for name, r in (("draftflow up", up), ("draftflow train", train)):
        print(f"{name:16}{r['trained']:>8}{r['wall_s']:>9.1f}{r['wall_rate']:>16.1f}"
              f"{r['trainer_rate']:>19.1f}{100 * r['wait']:>18.1f}%{r['loss']:>12.4f}")
    print(f"train / up: {train['wall_rate'] / up['wall_rate']:.2f}x wall, "
          f"{train['trainer_rate'] / max(up['trainer_rate'], 1e-9):.2f}x trainer")


if __name__ == "__main__":
    main()
