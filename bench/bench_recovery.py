"""Recovery: after the feature store loses every captured sample, does training keep its speed?

Builds a local random target, starts a Mooncake master, a coordinator process (SQLite) and one
``draftflow producer`` process per run, and creates two identical runs:

1. **baseline**: a trainer (``CoordinatorRunner`` in this process) trains the run while the
   producer captures it, as an online run does (capture and training overlap);
2. **all lost**: the producer captures every prompt first, then every tensor of the run is
   removed from the store, as a Mooncake master restart or a dead producer node would do, and the
   trainer starts: it meets each sample missing, reports it lost, the idle producer captures it
   again and the step goes on;

and prints each run's training wall time, steps per second and their ratio (goal >= 0.8: losses
drain at the speed of capture and training, not at one recapture per producer poll, which would
cap the second run at ``1 / retry_after`` = 1 step/s here).

    .venv/bin/python bench/bench_recovery.py [--prompts 64] [--micro-batch 4]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.coordinator_proc import start_coordinator  # noqa: E402
from draftflow.run_cli import create_run_request  # noqa: E402
from services.api import coordinator_pb2 as cpb  # noqa: E402
from services.api import coordinator_pb2_grpc  # noqa: E402
from services.capture import plan_for  # noqa: E402
from services.dataset import parse_line, prompt_id  # noqa: E402
from services.rpc.client import open_channel  # noqa: E402
from services.store import open_store  # noqa: E402
from services.store.mooncake_proc import start_master  # noqa: E402
from services.tensors import make_key  # noqa: E402
from services.tiny_model import DEFAULT_DATASET, build_tiny_target  # noqa: E402
from trainer.runner import CoordinatorRunner, RunnerConfig  # noqa: E402

STORE = "recovery"


def write_config(work: Path, target: Path, run_id: str, prompts: int, micro: int) -> Path:
    data = work / "data.jsonl"
    data.write_text("\n".join(DEFAULT_DATASET.read_text().splitlines()[:prompts]) + "\n")
    path = work / f"{run_id}.yaml"
    path.write_text(f"""run_id: {run_id}
dataset: {data}
target: {{model_path: {target}, revision: bench}}
capture: {{max_length: 128}}
draft: {{draft_vocab_size: 256, ttt_length: 3}}
step: {{world_size: 1, micro_batch: {micro}, accumulation: 1}}
training: {{learning_rate: 1.0e-3, checkpoint_every: 1000}}
lease: {{lease_seconds: 30, heartbeat_seconds: 1}}
watermark: {{high_samples: 0, low_samples: 0, retry_after_seconds: 1.0}}
""")
    return path


def wait_captured(stub: object, run_id: str, n: int) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = stub.GetRunStatus(  # type: ignore[attr-defined]
            cpb.GetRunStatusRequest(run_id=run_id)).status
        if status.prompts.get("CAPTURED", 0) >= n:
            return
        time.sleep(0.2)
    raise SystemExit(f"run {run_id}: capture did not finish")


def train(port: int, run_id: str, url: str, out: Path) -> tuple[float, int, int]:
    """(training wall seconds, steps, samples reported lost)."""
    runner = CoordinatorRunner(RunnerConfig(
        coordinator=f"127.0.0.1:{port}", run_id=run_id, store_url=url, out_dir=out,
        device="cpu", parallel="none", prefetch=2, export=False))
    started = time.perf_counter()
    try:
        steps = runner.run()
    finally:
        runner.close()
    return time.perf_counter() - started, steps, runner.status.samples_lost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=4)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    target = build_tiny_target(work / "target", num_layers=8, hidden_size=64, vocab_size=2048)
    master = start_master(log_path=work / "master.log")
    coord, port = start_coordinator(f"sqlite:///{work / 'c.db'}")
    channel = open_channel(f"127.0.0.1:{port}")
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    store = open_store(master.url(STORE, buffer_mb=16))
    producers: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    results = {}
    try:
        for run_id, lose in (("baseline", False), ("lost", True)):
            config = write_config(work, target, run_id, args.prompts, args.micro_batch)
            request = create_run_request(config, target)
            run = stub.CreateRun(request).run
            n = run.num_prompts
            producers.append(subprocess.Popen(
                [sys.executable, "-m", "draftflow", "--log-level", "WARNING", "producer",
                 "--coordinator", f"127.0.0.1:{port}", "--run", run_id, "--model-path",
                 str(target), "--device", "cpu", "--store",
                 master.url(STORE, segment_mb=256, buffer_mb=16), "--listen", "127.0.0.1:0",
                 "--metrics-port", "-1"],
                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if lose:
                wait_captured(stub, run_id, n)
                cfg = run.config
                tensors = plan_for(cfg.draft.algorithm, list(cfg.capture.aux_layer_ids),
                                   cfg.target.num_layers).tensors
                rows = Path(work / "data.jsonl").read_text().splitlines()
                store.remove([make_key(STORE, run_id, f"{prompt_id(parse_line(r))}:e0", 0, t)
                              for r in rows for t in tensors])
            results[run_id] = train(port, run_id, master.url(STORE, buffer_mb=16),
                                    work / run_id)
        print(f"{args.prompts} prompts, micro-batch {args.micro_batch}, producer poll "
              "(watermark.retry_after_seconds) 1.0 s")
        for run_id, (wall, steps, lost) in results.items():
            print(f"{run_id:9s} {steps:3d} steps in {wall:7.2f} s = {steps / wall:6.2f} steps/s, "
                  f"{lost} samples reported lost")
        base, rec = results["baseline"], results["lost"]
        print(f"steps/s, all lost / baseline: {(rec[1] / rec[0]) / (base[1] / base[0]):.3f} "
              "(goal >= 0.8)")
    finally:
        for p in producers:
            p.terminate()
        for p in producers:
            p.wait(timeout=30)
        store.close()
        channel.close()
        coord.terminate()
        coord.wait(timeout=10)
        master.stop()


if __name__ == "__main__":
    main()
