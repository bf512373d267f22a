"""Coordinator throughput: sample commits/s and samples/s delivered through StreamSteps.

Runs the real coordinator (``draftflow coordinator``) in its own process on SQLite and on
PostgreSQL, drives it over gRPC with 1, 4 and 16 concurrent clients and batch sizes 1 and 64,
and prints each figure with two ratios measured in the same run: against the gRPC health-check
rate at the same concurrency (the transport's floor) and PostgreSQL against SQLite.

    .venv/bin/python bench/bench_coordinator.py [--seconds 3] [--pg URL]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.coordinator_proc import start_coordinator  # noqa: E402
from services.api import common_pb2, coordinator_pb2_grpc  # noqa: E402
from services.api import coordinator_pb2 as cpb  # noqa: E402
from services.rpc.client import open_channel  # noqa: E402
from tests.coordinator import helpers as h  # noqa: E402


class Server:
    def __init__(self, db_url: str) -> None:
        self.proc, self.port = start_coordinator(db_url)
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def run_threads(n: int, fn: Callable[[int], None]) -> float:
    """Run ``fn(i)`` on n threads; re-raise the first failure."""
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            fn(i)
        except BaseException as exc:
            errors.append(exc)
            print(f"client {i} failed: {exc!r}", file=sys.stderr, flush=True)

    threads = [threading.Thread(target=guarded, args=(i,), daemon=True) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def health_rate(target: str, clients: int, seconds: float) -> float:
    stubs = [health_pb2_grpc.HealthStub(open_channel(target)) for _ in range(clients)]
    counts = [0] * clients
    stop = time.perf_counter() + seconds

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            stubs[i].Check(health_pb2.HealthCheckRequest())
            counts[i] += 1

    wall = run_threads(clients, loop)
    return sum(counts) / wall


def bench_case(target: str, clients: int, batch: int, seconds: float) -> dict[str, float]:
    run_id = f"b{uuid.uuid4().hex[:8]}"
    # Enough prompts that the commit phase never runs dry: about what the goal rate needs.
    prompts = max(clients * batch * 4, int((6000 if batch > 1 else 400) * seconds))
    config = h.run_config(world=clients, micro=batch, accum=1, high=0)
    config.lease.heartbeat_seconds = 600  # the benchmark's clients do not heartbeat
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(open_channel(target))
    stub.CreateRun(cpb.CreateRunRequest(run_id=run_id, config=config,
                                        dataset_lines=h.dataset(prompts),
                                        vocab_map=h.vocab_map()), timeout=600)
    fp = stub.GetRun(cpb.GetRunRequest(run_id=run_id)).run.fingerprint
    stubs = [coordinator_pb2_grpc.CoordinatorServiceStub(open_channel(target))
             for _ in range(clients)]
    committed = [0] * clients
    latencies: list[list[float]] = [[] for _ in range(clients)]
    stop = time.perf_counter() + seconds

    def produce(i: int) -> None:
        s = stubs[i]
        sid = s.RegisterWorker(cpb.RegisterWorkerRequest(
            run_id=run_id, role=common_pb2.WORKER_ROLE_PRODUCER, fingerprint=fp)).session_id
        while time.perf_counter() < stop:
            leases = s.LeasePrompts(cpb.LeasePromptsRequest(session_id=sid,
                                                            max_prompts=batch)).leases
            if not leases:
                return
            req = cpb.CommitSamplesRequest(session_id=sid,
                                           samples=[h.commit(le, run_id) for le in leases])
            t0 = time.perf_counter()
            s.CommitSamples(req)
            latencies[i].append(time.perf_counter() - t0)
            committed[i] += len(leases)

    wall = run_threads(clients, produce)
    commit_rate = sum(committed) / wall
    # Everything else is captured too, so delivery measures StreamSteps alone.
    s0 = stubs[0]
    sid = s0.RegisterWorker(cpb.RegisterWorkerRequest(
        run_id=run_id, role=common_pb2.WORKER_ROLE_PRODUCER, fingerprint=fp)).session_id
    while True:
        leases = s0.LeasePrompts(cpb.LeasePromptsRequest(session_id=sid, max_prompts=512)).leases
        if not leases:
            break
        s0.CommitSamples(cpb.CommitSamplesRequest(
            session_id=sid, samples=[h.commit(le, run_id) for le in leases]))
    delivered = [0] * clients
    # As in a real trainer group, no step is committed before every rank has its first slice.
    first = threading.Barrier(clients)

    def train(rank: int) -> None:
        s = stubs[rank]
        tid = s.RegisterWorker(cpb.RegisterWorkerRequest(
            run_id=run_id, role=common_pb2.WORKER_ROLE_TRAINER, fingerprint=fp,
            trainer_group="bench")).session_id
        for msg in s.StreamSteps(cpb.StreamStepsRequest(session_id=tid, rank=rank,
                                                        from_step=1, prefetch=8)):
            if msg.step == 1:
                first.wait(timeout=60)
            if msg.end_of_data:
                return
            delivered[rank] += len(msg.refs)
            if rank == 0:
                s.CommitStep(cpb.CommitStepRequest(session_id=tid, step=msg.step))

    wall = run_threads(clients, train)
    flat = [x for lat in latencies for x in lat]
    return {"commits_per_s": commit_rate, "delivered_per_s": sum(delivered) / wall,
            "commit_p50_ms": pct(flat, 0.5), "commit_p99_ms": pct(flat, 0.99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="commit phase per case")
    ap.add_argument("--pg", default=os.environ.get(
        "DRAFTFLOW_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
    pg_db = f"draftflow_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{pg_db}"'))
    tmp = tempfile.TemporaryDirectory()
    backends = {
        "sqlite": f"sqlite:///{tmp.name}/bench.db",
        "postgres": make_url(args.pg).set(database=pg_db).render_as_string(hide_password=False),
    }
    results: dict[str, dict[str, float]] = {}
    try:
        for backend, url in backends.items():
            server = Server(url)
            try:
                for clients in map(int, args.clients.split(",")):
                    floor = health_rate(server.target, clients, 1.0)
                    for batch in map(int, args.batches.split(",")):
                        r = bench_case(server.target, clients, batch, args.seconds)
                        r["health_rpc_per_s"] = floor
                        results[f"{backend}/c{clients}/b{batch}"] = r
                        print(f"{backend:8s} clients={clients:2d} batch={batch:2d}  "
                              f"commits/s {r['commits_per_s']:8.0f}  "
                              f"delivered/s {r['delivered_per_s']:8.0f}  "
                              f"commit p50 {r['commit_p50_ms']:6.2f} ms  "
                              f"p99 {r['commit_p99_ms']:6.2f} ms  "
                              f"(health RPC floor {floor:6.0f}/s; commit RPCs at "
                              f"{r['commits_per_s'] / batch / floor:4.2f}x of it)", flush=True)
            finally:
                server.stop()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)'))
        tmp.cleanup()
    print("\nPostgreSQL / SQLite, same run:")
    for key, r in results.items():
        if key.startswith("postgres/"):
            base = results["sqlite/" + key.split("/", 1)[1]]
            case = key.split("/", 1)[1]
            print(f"  {case:8s} commits {r['commits_per_s'] / base['commits_per_s']:.2f}x"
                  f"  delivered {r['delivered_per_s'] / base['delivered_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
