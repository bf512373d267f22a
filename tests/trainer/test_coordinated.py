"""Coordinator-driven training in process: Mooncake reads match in-process features bit for bit,
and a trainer whose node does not match the run is refused."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from services.api import common_pb2
from services.api import coordinator_pb2 as cpb
from services.store import open_store
from services.store.base import FeatureLost
from tests.trainer.coordinated import (
    Feeder,
    composition,
    create_run,
    make_runner,
    samples,
    status,
    step_losses,
    store_url,
    wait_for,
)
from trainer.config import TrainerConfig
from trainer.loop import build_trainer
from trainer.session import RegistrationRefused, aux_layer_ids
from trainer.steps import InProcessSteps

N = 16


def test_mooncake_reads_train_bit_identically_to_in_process_features(
        tiny, coordinator, stub, master, tmp_path: Path) -> None:
    run, features = create_run(stub, tiny, N, "parity", micro_batch=2, accumulation=2,
                               checkpoint_every=2)
    store_id = "parity"
    writer = open_store(store_url(master, store_id, segment_mb=64, buffer_mb=16))
    try:
        feeder = Feeder(stub, writer, run, features)
        feeder.feed(N)
        feeder.stop()
        runner = make_runner(coordinator, "parity", store_url(master, store_id, buffer_mb=16),
                             tmp_path / "out", prefetch=2, export=False)
        try:
            last = runner.run()
        finally:
            runner.close()
        # Committed steps free their samples' tensors from the store.
        for row in samples(coordinator, "parity"):
            ref = common_pb2.SampleRef.FromString(row.ref)
            with pytest.raises(FeatureLost):
                writer.get_sample(ref.tensors)
    finally:
        writer.close()
    assert last == N // 4 and runner.source is not None and runner.source.end_step == last + 1

    # The same samples, handed over in process in the order the coordinator composed them.
    cfg = TrainerConfig.from_run(run.config)
    baseline = build_trainer(cfg, tiny.target_dir, list(run.vocab_map.draft_token_ids),
                             aux_layer_ids(run), parallel="none")
    expected: list[tuple[int, float]] = []
    baseline.run(InProcessSteps(composition(coordinator, "parity", features), cfg.geometry),
                 on_step=lambda s, m: expected.append((s, m["loss"])))
    assert runner.losses == expected  # bit-identical, not approximately equal
    assert step_losses(coordinator, "parity") == [loss for _, loss in expected]

    st = status(stub, "parity")
    assert st.last_committed_step == st.last_checkpoint_step == last
    assert {k: v for k, v in st.samples.items() if v} == {"RETIRED": N}
    assert {r.step for r in samples(coordinator, "parity")} == set(range(1, last + 1))


def test_a_node_whose_fingerprint_differs_is_refused(tiny, coordinator, stub,
                                                     tmp_path: Path) -> None:
    run, _ = create_run(stub, tiny, 4, "fp")
    with pytest.raises(RegistrationRefused, match=f"run has {run.fingerprint}"):
        make_runner(coordinator, "fp", "memory://fp", tmp_path / "out", revision="other-weights")


def test_stream_reconnects_across_a_coordinator_restart(
        tiny, coordinator, stub, master, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from coordinator.server import CoordinatorConfig, CoordinatorProcess
    from services.rpc.server import ServerConfig

    run, features = create_run(stub, tiny, 8, "restart", micro_batch=2, checkpoint_every=100)
    writer = open_store(store_url(master, "restart", segment_mb=64, buffer_mb=16))
    feeder = Feeder(stub, writer, run, features)
    runner = make_runner(coordinator, "restart", store_url(master, "restart", buffer_mb=16),
                         tmp_path / "out", export=False)
    caplog.set_level(logging.WARNING, logger="trainer.session")
    result: dict[str, int] = {}
    training = threading.Thread(target=lambda: result.setdefault("step", runner.run()))
    second = None
    try:
        feeder.feed(4)
        training.start()
        wait_for(lambda: status(stub, "restart").last_committed_step == 2, 60, "step 2")
        # The trainer now waits in StreamSteps for step 3; the coordinator goes away under it.
        coordinator.stop(grace=0)
        second = CoordinatorProcess(CoordinatorConfig(
            db_url=coordinator.cfg.db_url, reap_seconds=0.2,
            server=ServerConfig(listen=f"127.0.0.1:{coordinator.port}")))
        feeder.feed(4)
        training.join(timeout=120)
        assert result.get("step") == 4
    finally:
        feeder.stop()
        runner.close()
        writer.close()
        if second is not None:
            second.stop(grace=0.5)
    assert [s for s, _ in runner.losses] == [1, 2, 3, 4]
    assert any(getattr(r, "action", None) == "stream_reconnect" for r in caplog.records)


def test_a_cancelled_run_exports_no_draft(tiny, coordinator, stub, master,
                                          tmp_path: Path) -> None:
    run, features = create_run(stub, tiny, N, "cancel", micro_batch=2, accumulation=2,
                               checkpoint_every=1)
    writer = open_store(store_url(master, "cancel", segment_mb=64, buffer_mb=16))
    try:
        feeder = Feeder(stub, writer, run, features)
        feeder.feed(N // 2)  # two of four steps: the trainer then waits for data
        runner = make_runner(coordinator, "cancel", store_url(master, "cancel", buffer_mb=16),
                             tmp_path / "out", prefetch=1)
        try:
            done: list[int] = []
            thread = threading.Thread(target=lambda: done.append(runner.run()), daemon=True)
            thread.start()
            wait_for(lambda: status(stub, "cancel").last_committed_step == 2, what="step 2")
            stub.CancelRun(cpb.CancelRunRequest(run_id="cancel", reason="test"))
            thread.join(timeout=120)
            assert done == [2] and runner.cancelled
        finally:
            runner.close()
        feeder.stop()
    finally:
        writer.close()
    assert not (tmp_path / "out" / "final").exists()
    assert (tmp_path / "out" / "checkpoints").is_dir()
