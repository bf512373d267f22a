"""Producer throughput against its engine alone: how busy does the work loop keep the model?

Builds a local random target (default 8 layers x hidden 512), prepares the example prompts, then
in the same run measures

1. the ``hf`` engine alone capturing them in batches of ``--lease-batch`` (the ceiling; run
   before and after the producer, the faster run counts), and
2. the whole producer (``Producer.run``): lease from a real coordinator process over gRPC,
   capture, write every sample to the feature store (a real Mooncake master by default),
   commit refs,

and prints samples/s and tokens/s of each, their ratio, and the fraction of the producer's wall
time the engine was busy. The goal is a ratio (and busy fraction) of at least 0.90.

    .venv/bin/python bench/bench_producer.py [--layers 8 --hidden 512 --prompts 200]
                                             [--store mooncake|memory] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from bench.coordinator_proc import start_coordinator  # noqa: E402
from producer.dataprep import parse_row, prepare_prompt  # noqa: E402
from producer.engines import EngineConfig, create_engine  # noqa: E402
from producer.vocab import describe_run, run_config_proto  # noqa: E402
from producer.worker import Producer, WorkerConfig  # noqa: E402
from services.api import coordinator_pb2 as cpb  # noqa: E402
from services.api import coordinator_pb2_grpc  # noqa: E402
from services.config import RunConfigFile  # noqa: E402
from services.rpc.client import open_channel  # noqa: E402
from services.store import open_store  # noqa: E402
from services.store.mooncake_proc import start_master  # noqa: E402
from services.tiny_model import DEFAULT_DATASET, build_tiny_target  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=3,
                    help="passes over the prompts; longer runs amortise start and end")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lease-batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--store", choices=("mooncake", "memory"), default="mooncake")
    args = ap.parse_args()

    model_dir = build_tiny_target(
        ROOT / ".draftflow" / f"bench-target-{args.layers}x{args.hidden}x{args.vocab}",
        num_layers=args.layers, hidden_size=args.hidden, vocab_size=args.vocab)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = DEFAULT_DATASET.read_text().splitlines()[: args.prompts]
    prompts = [prepare_prompt(tokenizer, parse_row(r), args.max_length) for r in rows]
    tokens = sum(p.num_tokens for p in prompts) * args.epochs
    samples = len(prompts) * args.epochs
    engine = create_engine("hf", EngineConfig(model_path=str(model_dir), device=args.device))
    batches = [prompts[i:i + args.lease_batch] for i in range(0, len(prompts), args.lease_batch)]
    engine.capture([p.input_ids.tolist() for p in batches[0]])  # warm-up

    def engine_alone() -> float:
        start = time.perf_counter()
        for _ in range(args.epochs):
            for batch in batches:
                engine.capture([p.input_ids.tolist() for p in batch])
        return time.perf_counter() - start

    alone_before = engine_alone()

    tmp = Path(tempfile.mkdtemp(prefix="draftflow-bench-"))
    coord, port = start_coordinator(f"sqlite:///{tmp / 'c.db'}")
    master = start_master(log_path=tmp / "master.log") if args.store == "mooncake" else None
    try:
        url = (master.url(f"b{uuid.uuid4().hex[:6]}", segment_mb=1024, buffer_mb=256)
               if master else f"memory://bench-{uuid.uuid4().hex[:6]}")
        store = open_store(url)
        channel = open_channel(f"127.0.0.1:{port}")
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
        cfg = RunConfigFile.model_validate({
            "run_id": "bench", "dataset": "conversations.jsonl", "epochs": args.epochs,
            "target": {"model_path": str(model_dir)},
            "capture": {"max_length": args.max_length}, "draft": {"draft_vocab_size": 1024},
            "watermark": {"high_samples": 0, "low_samples": 0},
        })
        facts = describe_run(model_dir, cfg, rows)
        run = stub.CreateRun(cpb.CreateRunRequest(
            run_id="bench", config=run_config_proto(cfg, facts), dataset_lines=rows,
            vocab_map=facts.vocab_map)).run
        producer = Producer(stub, store, engine, tokenizer, run,
                            WorkerConfig(run_id="bench", identity="bench",
                                         lease_batch=args.lease_batch,
                                         exit_when_captured=True))
        producer.register()
        start = time.perf_counter()
        stats = producer.run()
        producer_s = time.perf_counter() - start
        store.close()
        channel.close()
    finally:
        coord.terminate()
        coord.wait()
        if master is not None:
            master.stop()
    assert stats.samples_committed == samples, stats
    # Measured before and after the producer; the faster one is the (stricter) baseline, which
    # also keeps a neighbour's load spike on this machine from flattering the producer.
    alone_after = engine_alone()
    alone_s = min(alone_before, alone_after)

    print(f"target {args.layers} layers x hidden {args.hidden}, device {args.device}, "
          f"{len(prompts)} prompts x {args.epochs} epochs, {tokens} tokens, "
          f"lease batch {args.lease_batch}, "
          f"store {args.store}")
    print(f"{'':18}{'samples/s':>12}{'tokens/s':>12}")
    print(f"{'engine alone':18}{samples / alone_s:12.1f}{tokens / alone_s:12.0f}"
          f"   (runs: {alone_before:.1f} s before, {alone_after:.1f} s after the producer)")
    print(f"{'whole producer':18}{samples / producer_s:12.1f}{tokens / producer_s:12.0f}")
    print(f"producer / engine throughput: {alone_s / producer_s:.3f}")
    print(f"engine busy fraction in the producer: {stats.engine_busy_s / producer_s:.3f}")


if __name__ == "__main__":
    main()
