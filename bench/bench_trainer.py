"""Trainer data path: does reading through the coordinator and Mooncake slow the steps down?

Builds a local random target, creates a run on a coordinator process (SQLite) over gRPC, and
feeds it from this process: every prompt's features are written to a real Mooncake master and
committed, faster than the trainer consumes them (a producer that outpaces the trainer). In the
same run it measures

1. **in process**: ``Trainer.run`` over the very same samples in the same step order, handed over
   as tensors (``InProcessSteps``): the baseline step time (run before and after 2; the faster
   counts);
2. **through Mooncake**: ``CoordinatorRunner.run``: ``StreamSteps`` with prefetch, reads into
   preallocated buffers, ``CommitStep`` and freeing of retired tensors after every step;

and prints the mean step time of each (first steps excluded as warm-up), their ratio (goal
<= 1.05; as throughput, in process / Mooncake >= 0.9 for DFlash) and the fraction of the
Mooncake run's wall time spent waiting for data (goal < 0.02). ``--algorithm dflash`` or
``domino`` trains that strategy on its own features (K captured layers, no final state) and also
prints the bytes per token a sample holds against EAGLE3's at the same hidden size.

    .venv/bin/python bench/bench_trainer.py [--algorithm eagle3|dflash|domino]
        [--hidden 256 --length 256 --steps 30] [--micro-batch 4] [--prefetch 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.coordinator_proc import start_coordinator  # noqa: E402
from producer.vocab import describe_run, run_config_proto  # noqa: E402
from services.api import common_pb2, coordinator_pb2_grpc  # noqa: E402
from services.api import coordinator_pb2 as cpb  # noqa: E402
from services.capture import plan_for  # noqa: E402
from services.config import RunConfigFile  # noqa: E402
from services.dataset import parse_line, prompt_id  # noqa: E402
from services.rpc.client import open_channel  # noqa: E402
from services.store import open_store  # noqa: E402
from services.store.mooncake_proc import start_master  # noqa: E402
from services.tiny_model import DEFAULT_DATASET, build_tiny_target  # noqa: E402
from trainer.config import TrainerConfig  # noqa: E402
from trainer.loop import build_trainer  # noqa: E402
from trainer.runner import CoordinatorRunner, RunnerConfig  # noqa: E402
from trainer.session import aux_layer_ids  # noqa: E402
from trainer.steps import InProcessSteps  # noqa: E402

WARMUP = 3


DFLASH_LAYERS = [1, 3, 5]
"""Target layers the DFlash-family runs capture (of the bench target's 8)."""


def features_for(n: int, length: int, hidden: int, vocab: int, seed: int = 0,
                 algorithm: str = "eagle3") -> list[dict[str, torch.Tensor]]:
    """Random features of ``algorithm``'s capture plan (timing does not depend on what they
    mean)."""
    plan = plan_for(algorithm, [1, 3, 4] if algorithm == "eagle3" else DFLASH_LAYERS, 8)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        seq = length - (i * 7) % (length // 4)
        mask = torch.zeros(seq, dtype=torch.uint8)
        mask[seq // 4:] = 1
        sample = {
            "input_ids": torch.randint(0, vocab, (seq,), generator=gen),
            "loss_mask": mask,
            plan.layers_tensor: torch.randn(seq, len(plan.layer_ids) * hidden, generator=gen),
        }
        if plan.final_hidden:
            sample["hidden_state"] = torch.randn(seq, hidden, generator=gen)
        out.append(sample)
    return out


def bytes_per_token(samples: list[dict[str, torch.Tensor]]) -> float:
    """Feature-store bytes a captured token costs (every tensor of the sample)."""
    nbytes = sum(t.numel() * t.element_size() for s in samples for t in s.values())
    return nbytes / sum(int(s["input_ids"].numel()) for s in samples)


def feed(stub: object, store: object, run: cpb.Run, by_prompt: dict[str, dict[str, torch.Tensor]],
         stop: threading.Event) -> None:
    """A producer that outpaces the trainer: lease, write, commit, as fast as it can."""
    cap = run.config.capture
    plan = plan_for(run.config.draft.algorithm, list(cap.aux_layer_ids),
                    run.config.target.num_layers).to_proto()
    session = stub.RegisterWorker(cpb.RegisterWorkerRequest(  # type: ignore[attr-defined]
        run_id=run.run_id, role=common_pb2.WORKER_ROLE_PRODUCER, fingerprint=run.fingerprint,
        identity="bench-feeder")).session_id
    while not stop.is_set():
        resp = stub.LeasePrompts(cpb.LeasePromptsRequest(  # type: ignore[attr-defined]
            session_id=session, max_prompts=8))
        if resp.exhausted:
            return
        commits = []
        for le in resp.leases:
            feats = by_prompt[le.prompt_id]
            specs = store.put_sample(run.run_id, le.sample_id, le.generation, feats)  # type: ignore[attr-defined]
            commits.append(cpb.SampleCommit(lease_token=le.lease_token, ref=common_pb2.SampleRef(
                run_id=run.run_id, sample_id=le.sample_id, prompt_id=le.prompt_id,
                epoch=le.epoch, generation=le.generation, store=store.store_id,  # type: ignore[attr-defined]
                tensors=specs, num_tokens=int(feats["input_ids"].numel()), capture=plan)))
        if commits:
            stub.CommitSamples(cpb.CommitSamplesRequest(  # type: ignore[attr-defined]
                session_id=session, samples=commits))
        else:
            stop.wait(0.02)
        stub.Heartbeat(cpb.HeartbeatRequest(session_id=session))  # type: ignore[attr-defined]


def timing(timeline: list[tuple[float, float]]) -> tuple[float, float]:
    """(mean wall seconds per step, mean seconds inside train_step), warm-up steps left out."""
    walls = [b[0] - a[0] for a, b in itertools.pairwise(timeline)][WARMUP:]
    compute = [c for _, c in timeline[1:]][WARMUP:]
    return statistics.fmean(walls), statistics.fmean(compute)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--algorithm", choices=["eagle3", "dflash", "domino"], default="eagle3")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # leave a core to the data path

    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    target = build_tiny_target(work / "target", num_layers=8, hidden_size=args.hidden,
                               vocab_size=2048)
    n = args.steps * args.micro_batch
    rows = DEFAULT_DATASET.read_text().splitlines()[:n]
    if len(rows) < n:
        raise SystemExit(f"the example dataset has {len(rows)} rows; lower --steps")
    draft: dict[str, object] = {"algorithm": args.algorithm}
    if args.algorithm == "eagle3":
        draft.update(draft_vocab_size=512, ttt_length=7)
    else:
        draft["dflash"] = {"num_hidden_layers": 1, "target_layer_ids": DFLASH_LAYERS,
                           "block_size": 16, "num_anchors": 64, "loss_decay_gamma": 7.0}
    if args.algorithm == "domino":
        draft["domino"] = {"emb_dim": 64, "gru_hidden_dim": 64}
    cfg = RunConfigFile.model_validate({
        "run_id": "bench", "dataset": "conversations.jsonl", "epochs": 1,
        "target": {"model_path": str(target), "revision": "bench"},
        "capture": {"max_length": args.length}, "draft": draft,
        "step": {"world_size": 1, "micro_batch": args.micro_batch, "accumulation": 1},
        "training": {"learning_rate": 1e-3, "checkpoint_every": 10 * args.steps,
                     "max_grad_norm": 0.5},
        "lease": {"lease_seconds": 60, "heartbeat_seconds": 1},
        "watermark": {"high_samples": 0, "low_samples": 0},
    })
    facts = describe_run(target, cfg, rows)
    samples = features_for(n, args.length, args.hidden, facts.vocab_size,
                           algorithm=args.algorithm)
    by_prompt = {prompt_id(parse_line(r)): s for r, s in zip(rows, samples, strict=True)}

    master = start_master(log_path=work / "master.log")
    coord, port = start_coordinator(f"sqlite:///{work / 'c.db'}")
    channel = open_channel(f"127.0.0.1:{port}")
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    writer = open_store(master.url("bench", segment_mb=1024, buffer_mb=64))
    stop = threading.Event()
    try:
        run = stub.CreateRun(cpb.CreateRunRequest(
            run_id="bench", config=run_config_proto(cfg, facts), dataset_lines=rows,
            vocab_map=facts.vocab_map)).run
        feeder = threading.Thread(target=feed, args=(stub, writer, run, by_prompt, stop),
                                  daemon=True)
        feeder.start()
        runner = CoordinatorRunner(RunnerConfig(
            coordinator=f"127.0.0.1:{port}", run_id="bench",
            store_url=master.url("bench", buffer_mb=64), out_dir=work / "out",
            device=args.device, parallel="none", prefetch=args.prefetch, export=False))

        train_cfg = TrainerConfig.from_run(run.config)

        def in_process() -> tuple[float, float]:
            trainer = build_trainer(train_cfg, target, list(run.vocab_map.draft_token_ids),
                                    aux_layer_ids(run), parallel="none",
                                    dist_ctx=runner.dist)
            line: list[tuple[float, float]] = []
            trainer.run(InProcessSteps(samples, train_cfg.geometry), on_step=lambda _s, m:
                        line.append((time.perf_counter(), m["step_seconds"])))
            return timing(line)

        before = in_process()
        started = time.perf_counter()
        try:
            runner.run()
        finally:
            runner.close()
        wall = time.perf_counter() - started
        after = in_process()
        through = timing(runner.timeline)
        base = min(before, after)
        st = runner.status
        print(f"device {args.device}, hidden {args.hidden}, length <= {args.length}, "
              f"{args.micro_batch} samples/step, {args.steps} steps, prefetch {args.prefetch}, "
              f"{torch.get_num_threads()} torch threads")
        for name, (wall_s, compute_s) in (("in process, before", before),
                                          ("through Mooncake", through),
                                          ("in process, after", after)):
            print(f"{name:20s} step {1000 * wall_s:8.1f} ms wall, {1000 * compute_s:8.1f} ms in "
                  f"train_step, wall/compute {wall_s / compute_s:.3f}")
        print(f"step time, Mooncake / in process (faster run): {through[0] / base[0]:.3f} "
              "(goal <= 1.05)")
        print("step time over compute, Mooncake / in process (drift-free): "
              f"{(through[0] / through[1]) / (base[0] / base[1]):.3f}")
        print(f"throughput, Mooncake / in process: {base[0] / through[0]:.3f} (goal >= 0.9)")
        print(f"data wait           {st.data_wait_seconds:8.3f} s of {wall:.2f} s wall = "
              f"{100 * st.data_wait_fraction:.2f} % (goal < 2 %)")
        if args.algorithm != "eagle3":
            eagle3 = bytes_per_token(features_for(n, args.length, args.hidden,
                                                  facts.vocab_size))
            mine = bytes_per_token(samples)
            print(f"bytes per token: {args.algorithm} {mine:.0f}, eagle3 {eagle3:.0f} "
                  f"({len(DFLASH_LAYERS)} layers vs 3 aux + final; ratio {mine / eagle3:.3f})")
    finally:
        stop.set()
        writer.close()
        channel.close()
        coord.terminate()
        coord.wait(timeout=10)
        master.stop()


if __name__ == "__main__":
    main()
