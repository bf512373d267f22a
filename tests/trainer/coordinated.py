"""Builders for coordinator-driven trainer tests: runs, a feeding producer, DB views."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import torch
from sqlalchemy import select

from coordinator.schema import SampleRow, StepRow
from producer.vocab import describe_run, run_config_proto
from services.api import common_pb2, run_pb2
from services.api import coordinator_pb2 as cpb
from services.config import RunConfigFile
from services.dataset import parse_line, prompt_id
from services.fingerprint import vocab_map_hash
from services.store.base import FeatureStore
from services.tiny_model import DEFAULT_DATASET
from trainer.runner import CoordinatorRunner, RunnerConfig

S, STEPS = SampleRow.__table__, StepRow.__table__


def create_run(stub: Any, tiny: Any, n: int, run_id: str, world_size: int = 1,
               micro_batch: int = 2, accumulation: int = 1, checkpoint_every: int = 5,
               lease_seconds: float = 30, max_deliveries: int = 3,
               ) -> tuple[cpb.Run, dict[str, dict[str, torch.Tensor]]]:
    """A run over the first ``n`` example rows whose features are ``tiny.train[:n]``.

    Returns the run and the features each prompt id stands for (what a producer writes).
    """
    rows = DEFAULT_DATASET.read_text().splitlines()[:n]
    cfg = RunConfigFile.model_validate({
        "run_id": run_id, "dataset": "conversations.jsonl", "epochs": 1,
        "target": {"model_path": str(tiny.target_dir), "revision": "tiny"},
        "capture": {"max_length": 256}, "draft": {"draft_vocab_size": len(tiny.draft_token_ids),
                                                  "ttt_length": 3},
        "step": {"world_size": world_size, "micro_batch": micro_batch,
                 "accumulation": accumulation},
        "training": {"learning_rate": 3e-3, "warmup_steps": 3,
                     "checkpoint_every": checkpoint_every, "seed": 7, "max_grad_norm": 0.5},
        "lease": {"lease_seconds": lease_seconds, "heartbeat_seconds": 1.0,
                  "heartbeat_misses": 5, "max_deliveries": max_deliveries},
        "watermark": {"high_samples": 0, "low_samples": 0},
    })
    facts = describe_run(tiny.target_dir, cfg, rows)
    ids = list(tiny.draft_token_ids)
    d2t = [t - i for i, t in enumerate(ids)]
    vocab = run_pb2.VocabMap(d2t=d2t, draft_token_ids=ids, hash=vocab_map_hash(d2t, ids))
    run = stub.CreateRun(cpb.CreateRunRequest(
        run_id=run_id, config=run_config_proto(cfg, facts), dataset_lines=rows,
        vocab_map=vocab)).run
    features = {prompt_id(parse_line(r)): tiny.train[i] for i, r in enumerate(rows)}
    return run, features


class Feeder:
    """Plays the producer through the real API: leases prompts, writes each prompt's fixed
    features to the store under the leased generation, commits the refs. Deterministic, so a
    recaptured sample holds the very bytes it held before."""

    def __init__(self, stub: Any, store: FeatureStore, run: cpb.Run,
                 features: dict[str, dict[str, torch.Tensor]]) -> None:
        self.stub, self.store, self.run, self.features = stub, store, run, features
        self.session = stub.RegisterWorker(cpb.RegisterWorkerRequest(
            run_id=run.run_id, role=common_pb2.WORKER_ROLE_PRODUCER,
            fingerprint=run.fingerprint, identity="test-feeder")).session_id
        self.committed = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._keeper = threading.Thread(target=self._beat, name="test-feeder-heartbeat",
                                        daemon=True)
        self._keeper.start()

    def _beat(self) -> None:
        interval = self.run.config.lease.heartbeat_seconds
        while not self._stop.wait(interval):
            try:
                self.stub.Heartbeat(cpb.HeartbeatRequest(session_id=self.session))
            except grpc.RpcError:
                return  # the coordinator is gone or dropped us: feed() will say so loudly

    def feed(self, max_prompts: int) -> int:
        """Lease up to ``max_prompts`` and commit them in one call; return how many."""
        leases = self.stub.LeasePrompts(cpb.LeasePromptsRequest(
            session_id=self.session, max_prompts=max_prompts)).leases
        commits = []
        for le in leases:
            feats = self.features[le.prompt_id]
            specs = self.store.put_sample(self.run.run_id, le.sample_id, le.generation, feats)
            ref = common_pb2.SampleRef(
                run_id=self.run.run_id, sample_id=le.sample_id, prompt_id=le.prompt_id,
                epoch=le.epoch, generation=le.generation, store=self.store.store_id,
                tensors=specs, num_tokens=int(feats["input_ids"].numel()),
                producer_id="test-feeder")
            commits.append(cpb.SampleCommit(ref=ref, lease_token=le.lease_token))
        if commits:
            results = self.stub.CommitSamples(cpb.CommitSamplesRequest(
                session_id=self.session, samples=commits)).results
            assert all(r.status == cpb.COMMIT_STATUS_ACCEPTED for r in results), results
        self.committed += len(commits)
        return len(commits)

    def start(self) -> None:
        """Keep feeding (first captures and recaptures) on a thread until ``stop``."""
        def loop() -> None:
            while not self._stop.is_set():
                if not self.feed(64):
                    self._stop.wait(0.05)

        self._thread = threading.Thread(target=loop, name="test-feeder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._keeper.join(timeout=10)


def status(stub: Any, run_id: str) -> cpb.RunStatus:
    return stub.GetRunStatus(cpb.GetRunStatusRequest(run_id=run_id)).status


def samples(coordinator: Any, run_id: str) -> list[Any]:
    """Every sample row of a run, by (step, slot)."""
    with coordinator.engine.connect() as conn:
        return conn.execute(select(S).where(S.c.run_id == run_id)
                            .order_by(S.c.step, S.c.slot)).all()


def step_losses(coordinator: Any, run_id: str) -> list[float]:
    with coordinator.engine.connect() as conn:
        return list(conn.execute(select(STEPS.c.loss).where(STEPS.c.run_id == run_id)
                                 .order_by(STEPS.c.step)).scalars())


def composition(coordinator: Any, run_id: str,
                features: dict[str, dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The run's samples' features in training order (step, slot)."""
    return [features[r.prompt_id] for r in samples(coordinator, run_id) if r.step is not None]


def runner_config(coordinator: Any, run_id: str, store_url: str, out: Path,
                  **kw: Any) -> RunnerConfig:
    return RunnerConfig(coordinator=f"127.0.0.1:{coordinator.port}", run_id=run_id,
                        store_url=store_url, out_dir=out, device="cpu", parallel="none", **kw)


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def store_url(master: Any, store_id: str | None = None, **params: Any) -> str:
    return master.url(store_id or f"t{uuid.uuid4().hex[:8]}", **params)


def make_runner(coordinator: Any, run_id: str, url: str, out: Path,
                **kw: Any) -> CoordinatorRunner:
    return CoordinatorRunner(runner_config(coordinator, run_id, url, out, **kw))
