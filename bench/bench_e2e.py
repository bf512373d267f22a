"""End to end: how fast does ``draftflow up``'s topology train, against one process doing the same?

In one run, on the same config (default ``examples/tiny.yaml``), measures

1. **draftflow up**: every role its own process (coordinator on SQLite, Mooncake master and
   holder, ``--producers`` HF producers, one trainer); features go through Mooncake and only refs
   through the coordinator. Figures come from the trainer (samples trained per second since it
   started training, and the fraction of that time it waited for data) and from the wall clock.
2. **one process**: the same target, prompts, epochs, draft and step geometry; a capture thread
   runs the same HF engine and hands each sample's features to the trainer through an in-memory
   queue; the trainer thread trains as they come. No coordinator, no store, no sockets.

and prints samples/s and data-wait fraction of each and their ratio (goal >= 0.9). Both sides
share this machine's cores between capture and training in the same way (capture and training
overlap), so the ratio measures what the disaggregated data path costs.

    .venv/bin/python bench/bench_e2e.py [--config examples/tiny.yaml] [--producers 1]
                                        [--epochs N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from producer.dataprep import PromptError, parse_row, prepare_prompt  # noqa: E402
from producer.engines import EngineConfig, create_engine  # noqa: E402
from producer.features import eagle3_features  # noqa: E402
from producer.vocab import describe_run, run_config_proto  # noqa: E402
from services.api import coordinator_pb2 as cpb  # noqa: E402
from services.config import load_run_config  # noqa: E402
from trainer.config import TrainerConfig  # noqa: E402
from trainer.loop import build_trainer  # noqa: E402
from trainer.parallel import init_distributed  # noqa: E402
from trainer.session import aux_layer_ids  # noqa: E402
from trainer.steps import StepBundle, rank_slice  # noqa: E402

LEASE_BATCH = 8
"""Prompts captured together, as the producer's default ``--lease-batch``."""


def run_up(config: Path, work: Path, producers: int, device: str) -> tuple[dict, float]:
    """``draftflow up`` in a fresh work directory; (its summary.json, wall seconds)."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "draftflow", "up", "--config", str(config), "--workdir",
         str(work), "--fresh", "--producers", str(producers), "--device", device],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"draftflow up failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    run_id = load_run_config(config).run_id
    return json.loads((work / "runs" / run_id / "summary.json").read_text()), wall


class QueueSteps:
    """Step bundles cut from samples as a capture thread puts them in a queue (None ends it)."""

    def __init__(self, source: queue.Queue, per_step: int, geometry: object) -> None:
        self.source, self.per_step, self.geometry = source, per_step, geometry
        self.wait_seconds = 0.0

    def steps(self, from_step: int = 1) -> Iterator[StepBundle]:
        step, bundle = 0, []
        while True:
            t0 = time.perf_counter()
            item = self.source.get()
            self.wait_seconds += time.perf_counter() - t0
            if item is None:
                return
            bundle.append(item)
            if len(bundle) == self.per_step:
                step += 1
                yield StepBundle(step, rank_slice(bundle, self.geometry, 0))  # type: ignore[arg-type]
                bundle = []


def run_in_process(config: Path, work: Path, device: str) -> dict[str, float]:
    """Capture and train in this process, features handed over in memory."""
    from transformers import AutoTokenizer

    cfg = load_run_config(config)
    model_dir = cfg.model_path(config).resolve()
    lines = cfg.dataset_path(config).read_text().splitlines()
    facts = describe_run(model_dir, cfg, lines)
    run = cpb.Run(run_id=cfg.run_id, config=run_config_proto(cfg, facts),
                  vocab_map=facts.vocab_map)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = []
    for line in lines:
        try:
            prompts.append(prepare_prompt(tokenizer, parse_row(line), cfg.capture.max_length,
                                          cfg.capture.chat_template))
        except PromptError:
            continue
    engine = create_engine("hf", EngineConfig(model_path=str(model_dir), device=device))
    train_cfg = TrainerConfig.from_run(run.config)
    dist_ctx = init_distributed(device)
    trainer = build_trainer(train_cfg, model_dir, list(run.vocab_map.draft_token_ids),
                            aux_layer_ids(run), dist_ctx=dist_ctx, parallel="none",
                            checkpoint_dir=work / "checkpoints")  # checkpoints as up writes
    handoff: queue.Queue = queue.Queue(maxsize=cfg.watermark.high_samples or 0)

    def capture() -> None:
        try:
            for _ in range(cfg.epochs):
                for i in range(0, len(prompts), LEASE_BATCH):
                    batch = prompts[i:i + LEASE_BATCH]
                    got = engine.capture([p.input_ids.tolist() for p in batch])
                    for prompt, captured in zip(batch, got, strict=True):
                        handoff.put(eagle3_features(prompt, captured))
        finally:
            handoff.put(None)

    source = QueueSteps(handoff, train_cfg.geometry.per_step, train_cfg.geometry)
    thread = threading.Thread(target=capture, daemon=True)
    start = time.perf_counter()
    thread.start()
    trainer.run(source)
    elapsed = time.perf_counter() - start
    thread.join()
    trained = trainer.step * train_cfg.geometry.per_step
    return {"samples": trained, "seconds": elapsed, "samples_per_second": trained / elapsed,
            "data_wait_fraction": source.wait_seconds / elapsed, "steps": trainer.step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "tiny.yaml")
    ap.add_argument("--producers", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for both sides")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    config = args.config.resolve()
    if args.epochs is not None:
        # A copy with absolute paths, so it can live elsewhere than the original.
        cfg = load_run_config(config)
        data = yaml.safe_load(config.read_text())
        data["epochs"] = args.epochs
        data["dataset"] = str(cfg.dataset_path(config).resolve())
        data["target"]["model_path"] = str(cfg.model_path(config).resolve())
        config = work / "run.yaml"
        config.write_text(yaml.safe_dump(data))
    # The one-process baseline runs before and after; the faster counts (the stricter ratio,
    # and a neighbour's load spike on a shared machine cannot flatter draftflow up).
    before = run_in_process(config, work / "before", args.device)
    summary, up_wall = run_up(config, work / "up", args.producers, args.device)
    after = run_in_process(config, work / "after", args.device)
    local = max(before, after, key=lambda r: r["samples_per_second"])

    t = summary["trainer"]
    trained = summary["samples"].get("TRAINED", 0) + summary["samples"].get("RETIRED", 0)
    print(f"config {args.config.name}: {trained} samples, {summary['steps']} steps, "
          f"{args.producers} producer(s), device {args.device}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads here")
    print(f"{'':28}{'samples/s':>10}{'data wait':>11}")
    print(f"{'draftflow up (trainer)':28}{t['samples_per_second']:10.2f}"
          f"{100 * t['data_wait_fraction']:10.1f}%   (whole command {up_wall:.0f} s wall, "
          f"{trained / up_wall:.2f} samples/s including start-up)")
    for name, r in (("one process, before", before), ("one process, after", after)):
        print(f"{name:28}{r['samples_per_second']:10.2f}"
              f"{100 * r['data_wait_fraction']:10.1f}%   ({r['seconds']:.0f} s)")
    print(f"ratio up / one process (faster run): "
          f"{t['samples_per_second'] / local['samples_per_second']:.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
