"""Builders for producer tests: runs on a real coordinator, producers, and a trainer's view."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from producer.engines.base import CaptureEngine
from producer.vocab import describe_run, run_config_proto
from producer.worker import Producer, WorkerConfig
from services.api import common_pb2
from services.api import coordinator_pb2 as cpb
from services.config import RunConfigFile
from services.store.base import FeatureStore
from services.tiny_model import DEFAULT_DATASET


def lines(n: int) -> list[str]:
    """The first ``n`` rows of the example dataset."""
    return DEFAULT_DATASET.read_text().splitlines()[:n]


def create_run(stub: Any, model_dir: Path, dataset: list[str], run_id: str = "r1",
               epochs: int = 1, lease_seconds: float = 30, heartbeat_seconds: float = 1,
               max_attempts: int = 3, regenerate: dict[str, Any] | None = None) -> cpb.Run:
    """Create a run the way `draftflow run create` does: facts from the target, then CreateRun."""
    cfg = RunConfigFile.model_validate({
        "run_id": run_id, "dataset": "conversations.jsonl", "epochs": epochs,
        "target": {"model_path": str(model_dir), "revision": "tiny"},
        "capture": {"max_length": 96}, "draft": {"draft_vocab_size": 256},
        "lease": {"lease_seconds": lease_seconds, "heartbeat_seconds": heartbeat_seconds,
                  "heartbeat_misses": 2, "max_attempts": max_attempts},
        "watermark": {"high_samples": 0, "low_samples": 0},
        **({} if regenerate is None else {"regenerate": regenerate}),
    })
    facts = describe_run(model_dir, cfg, dataset)
    return stub.CreateRun(cpb.CreateRunRequest(
        run_id=run_id, config=run_config_proto(cfg, facts), dataset_lines=dataset,
        vocab_map=facts.vocab_map)).run


def make_producer(stub: Any, store: FeatureStore, engine: CaptureEngine, model_dir: Path,
                  run: cpb.Run, **kw: Any) -> Producer:
    """A producer that stops once every prompt is captured: these runs have no trainer to end
    them. Pass ``exit_when_captured=False`` to wait for the run's end instead."""
    kw.setdefault("exit_when_captured", True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return Producer(stub, store, engine, tokenizer, run,
                    WorkerConfig(run_id=run.run_id, identity="test-producer", **kw))


def status(stub: Any, run_id: str = "r1") -> cpb.RunStatus:
    return stub.GetRunStatus(cpb.GetRunStatusRequest(run_id=run_id)).status


def read_all_steps(stub: Any, run: cpb.Run, store: FeatureStore
                   ) -> list[tuple[common_pb2.SampleRef, dict[str, torch.Tensor]]]:
    """Stream every step as a trainer would, read each sample, commit the step."""
    tid = stub.RegisterWorker(cpb.RegisterWorkerRequest(
        run_id=run.run_id, role=common_pb2.WORKER_ROLE_TRAINER, fingerprint=run.fingerprint,
        identity="test-trainer", trainer_group="test")).session_id
    out = []
    for msg in stub.StreamSteps(cpb.StreamStepsRequest(session_id=tid, rank=0, from_step=1,
                                                       prefetch=4)):
        if msg.end_of_data:
            break
        out.extend((ref, store.get_sample(ref.tensors)) for ref in msg.refs)
        stub.CommitStep(cpb.CommitStepRequest(session_id=tid, step=msg.step, loss=0.0))
    return out
