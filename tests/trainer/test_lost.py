"""A tensor lost before the trainer reads it: reported, recaptured by a producer, trained in its
step; meanwhile TrainerService answers status and takes a checkpoint on request."""

from __future__ import annotations

import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import select
from transformers import AutoTokenizer

from coordinator.schema import SampleRow
from producer.engines import EngineConfig, create_engine
from producer.worker import Producer, WorkerConfig
from services.api import common_pb2, trainer_pb2, trainer_pb2_grpc
from services.rpc.server import ServerConfig
from services.store import open_store
from tests.trainer.coordinated import (
    Feeder,
    create_run,
    make_runner,
    samples,
    status,
    store_url,
    wait_for,
)
from trainer import checkpoint as ckpt
from trainer.service import TrainerServer

STEPS, PER_STEP, LOST_STEP = 4, 2, 3


def test_lost_sample_is_recaptured_and_trained_in_its_step(
        tiny, coordinator, stub, master, tmp_path: Path) -> None:
    n = STEPS * PER_STEP
    run, features = create_run(stub, tiny, n, "lost", checkpoint_every=100)
    writer = open_store(store_url(master, "lost", segment_mb=64, buffer_mb=16))
    feeder = Feeder(stub, writer, run, features)
    engine = create_engine("hf", EngineConfig(model_path=str(tiny.target_dir), device="cpu"))
    server = runner = None
    try:
        feeder.feed(n)
        feeder.stop()
        # Steps are filled in commit order: the 5th sample committed lands in step 3.
        with coordinator.engine.connect() as conn:
            row = conn.execute(select(SampleRow.__table__).where(SampleRow.run_id == "lost")
                               .order_by(SampleRow.id)).all()[(LOST_STEP - 1) * PER_STEP]
        victim = common_pb2.SampleRef.FromString(row.ref)
        writer.remove([t.key for t in victim.tensors])

        runner = make_runner(coordinator, "lost", store_url(master, "lost", buffer_mb=16),
                             tmp_path / "out", export=False)
        server = TrainerServer(runner, ServerConfig(listen="127.0.0.1:0"), metrics_port=0)
        result: dict[str, object] = {}
        training = threading.Thread(target=lambda: result.setdefault("step", runner.run()))
        training.start()
        wait_for(lambda: status(stub, "lost").samples.get("LOST", 0) == 1, 60, "the report")

        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        trainer_stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # Held at step 3 until the sample is back; a checkpoint asked now follows step 3.
        wait_for(lambda: runner.status.step == LOST_STEP - 1, 60, "steps before the loss")
        st = trainer_stub.GetStatus(trainer_pb2.TrainerGetStatusRequest())
        assert (st.run_id, st.step, st.world_size, st.device) == ("lost", 2, 1, "cpu")
        assert len(st.accuracies) == 3 and st.loss > 0 and st.simulated_acceptance_length >= 1
        assert 0 <= st.data_wait_fraction <= 1 and st.samples_per_second > 0
        assert 0 < st.majority_accuracy <= 1
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as r:
            scraped = r.read().decode()
        assert 'draftflow_trainer_step{run_id="lost"} 2.0' in scraped
        assert 'draftflow_trainer_accuracy{position="0",run_id="lost"}' in scraped
        pool = ThreadPoolExecutor(1)
        saved = pool.submit(trainer_stub.SaveCheckpoint, trainer_pb2.SaveCheckpointRequest(),
                            timeout=120)

        # A real producer recaptures the lost prompt (a new generation) and training goes on.
        producer = Producer(stub, writer, engine, AutoTokenizer.from_pretrained(tiny.target_dir),
                            run, WorkerConfig(run_id="lost", identity="recapture",
                                                  exit_when_captured=True))
        stats = producer.run()
        assert stats.samples_committed == 1
        answer = saved.result(timeout=120)
        assert answer.step == LOST_STEP
        assert answer.uri == ckpt.checkpoint_path(tmp_path / "out" / "checkpoints",
                                                  LOST_STEP).resolve().as_uri()
        training.join(timeout=120)
        assert result["step"] == STEPS
        assert trainer_stub.GetStatus(trainer_pb2.TrainerGetStatusRequest()).step == STEPS
        channel.close()
        pool.shutdown()
    finally:
        if server is not None:
            server.stop(0.5)
        if runner is not None:
            runner.close()
        engine.close()
        writer.close()

    # Nothing skipped: every step full, every sample trained; the lost one once, in step 3.
    rows = samples(coordinator, "lost")
    assert {r.sample_state for r in rows} == {"RETIRED"}
    assert sorted((r.step, r.slot) for r in rows) == [
        (s, k) for s in range(1, STEPS + 1) for k in range(PER_STEP)]
    lost = next(r for r in rows if r.sample_id == victim.sample_id)
    assert (lost.step, lost.generation, lost.losses) == (LOST_STEP, 1, 1)
    assert common_pb2.SampleRef.FromString(lost.ref).producer_id != "test-feeder"
    assert runner.status.samples_lost == 1
    st = status(stub, "lost")
    assert (st.last_committed_step, st.last_checkpoint_step) == (STEPS, STEPS)


def test_sample_lost_too_often_is_replaced_and_training_goes_on(
        tiny, coordinator, stub, master, tmp_path: Path) -> None:
    n = STEPS * PER_STEP + 1  # one sample to spare
    run, features = create_run(stub, tiny, n, "dead", checkpoint_every=100, max_deliveries=1)
    writer = open_store(store_url(master, "dead", segment_mb=64, buffer_mb=16))
    feeder = Feeder(stub, writer, run, features)
    try:
        feeder.feed(n)
        feeder.stop()
        with coordinator.engine.connect() as conn:
            row = conn.execute(select(SampleRow.__table__).where(SampleRow.run_id == "dead")
                               .order_by(SampleRow.id)).all()[PER_STEP]  # lands in step 2
        victim = common_pb2.SampleRef.FromString(row.ref)
        writer.remove([t.key for t in victim.tensors])

        runner = make_runner(coordinator, "dead", store_url(master, "dead", buffer_mb=16),
                             tmp_path / "out", export=False)
        try:
            # One loss is all max_deliveries allows: the sample dies and the spare takes its
            # slot, so step 2 is still full and training reaches the end.
            assert runner.run() == STEPS
            assert runner.status.samples_lost == 1
        finally:
            runner.close()
    finally:
        writer.close()
    rows = samples(coordinator, "dead")
    dead = [r for r in rows if r.sample_state == "DEAD"]
    assert [r.sample_id for r in dead] == [victim.sample_id] and dead[0].step is None
    trained = [r for r in rows if r.step is not None]
    assert sorted((r.step, r.slot) for r in trained) == [
        (s, k) for s in range(1, STEPS + 1) for k in range(PER_STEP)]
    assert victim.sample_id not in {r.sample_id for r in trained}
    assert status(stub, "dead").last_committed_step == STEPS
