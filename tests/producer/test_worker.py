"""The work loop against a real coordinator (gRPC over a socket, SQLite) and the memory store."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from sqlalchemy import text

from producer.dataprep import messages_from_conversation, prepare_prompt
from producer.worker import ProducerStats, RegistrationRefused
from services.api import common_pb2
from services.api import coordinator_pb2 as cpb
from services.dataset import parse_line, prompt_id
from services.store.memory import MemoryStore
from tests.conftest import RetryCounter
from tests.producer.helpers import create_run, lines, make_producer, read_all_steps, status

EAGLE3_TENSORS = ("input_ids", "loss_mask", "aux_hidden_state", "hidden_state")

LONG_USER = json.dumps({"conversations": [
    {"from": "human", "value": "word " * 200}, {"from": "gpt", "value": "ok"}]})
TOO_LONG_REASON = "no assistant token within max_length=96"


def test_every_prompt_is_captured_once_per_epoch(stub, store, engine, llama_dir: Path,
                                                 llama_tokenizer) -> None:
    rows = [*lines(12), LONG_USER]
    run = create_run(stub, llama_dir, rows, epochs=2)
    stats = make_producer(stub, store, engine, llama_dir, run, lease_batch=5).run()
    assert stats.samples_committed == 24
    assert stats.prompts_failed == 2
    st = status(stub)
    assert st.prompts["CAPTURED"] == 24 and st.prompts["DEAD"] == 2
    assert st.prompts.get("PENDING", 0) == st.prompts.get("LEASED", 0) == 0
    assert [w for w in st.workers if w.role == common_pb2.WORKER_ROLE_PRODUCER] == []

    convs = {prompt_id(parse_line(row)): parse_line(row) for row in rows}
    samples = read_all_steps(stub, run, store)
    assert sorted(ref.sample_id for ref, _ in samples) == sorted(
        f"{pid}:e{e}" for pid in convs if pid != prompt_id(parse_line(LONG_USER))
        for e in range(len({r.epoch for r, _ in samples})))
    for ref, tensors in samples:
        assert ref.store == "mem" and ref.producer_id == "test-producer"
        assert tuple(tensors) == EAGLE3_TENSORS
        prompt = prepare_prompt(llama_tokenizer, messages_from_conversation(convs[ref.prompt_id]),
                                max_length=96)
        assert ref.num_tokens == prompt.num_tokens
        assert torch.equal(tensors["input_ids"], prompt.input_ids)
        assert torch.equal(tensors["loss_mask"], prompt.loss_mask)
        alone = engine.capture([prompt.input_ids.tolist()])[0]
        # Captured in a padded batch: equal to a capture alone up to float32 rounding.
        torch.testing.assert_close(tensors["hidden_state"], alone.hidden_state,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tensors["aux_hidden_state"], alone.aux_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_too_long_row_is_dead_with_its_reason(stub, store, engine, llama_dir: Path,
                                              coordinator) -> None:
    run = create_run(stub, llama_dir, [*lines(3), LONG_USER])
    make_producer(stub, store, engine, llama_dir, run).run()
    with coordinator.engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM samples")).mappings().all()
    dead = [r for r in rows if r["prompt_state"] == "DEAD"]
    assert len(dead) == 1
    assert dead[0]["reason"].startswith(TOO_LONG_REASON)
    assert dead[0]["attempts"] == 1


def _producing(producer) -> tuple[threading.Thread, list[ProducerStats]]:  # type: ignore[no-untyped-def]
    result: list[ProducerStats] = []
    thread = threading.Thread(target=lambda: result.append(producer.run()), daemon=True)
    thread.start()
    return thread, result


def _wait(predicate, what: str, timeout_s: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_captured_producer_waits_recaptures_and_stops_when_the_run_completes(
        stub, store, engine, llama_dir: Path) -> None:
    run = create_run(stub, llama_dir, lines(4))
    producer = make_producer(stub, store, engine, llama_dir, run, exit_when_captured=False)
    thread, result = _producing(producer)
    _wait(lambda: status(stub).prompts.get("CAPTURED", 0) == 4, "the first capture")
    time.sleep(1.5)  # more than one retry_after: an idle producer keeps waiting
    assert thread.is_alive() and not result
    assert [w.identity for w in status(stub).workers] == ["test-producer"]

    # A trainer finds one sample's tensors gone: its prompt goes back to capture.
    tid = stub.RegisterWorker(cpb.RegisterWorkerRequest(
        run_id=run.run_id, role=common_pb2.WORKER_ROLE_TRAINER, fingerprint=run.fingerprint,
        identity="lost-finder", trainer_group="test")).session_id
    sample_id = f"{prompt_id(parse_line(lines(1)[0]))}:e0"
    assert stub.ReportLost(cpb.ReportLostRequest(
        session_id=tid, sample_id=sample_id, generation=0, reason="test")).recapture
    stub.UnregisterWorker(cpb.UnregisterWorkerRequest(session_id=tid))
    _wait(lambda: producer.stats.samples_committed == 5, "the recapture")
    assert thread.is_alive()

    # Training every step completes the run; the producer sees that and stops.
    samples = read_all_steps(stub, run, store)
    assert len(samples) == 4
    assert {ref.generation for ref, _ in samples if ref.sample_id == sample_id} == {1}
    thread.join(timeout=30)
    assert not thread.is_alive(), "the producer did not stop when the run completed"
    assert result[0].samples_committed == 5
    assert [w for w in status(stub).workers if w.role == common_pb2.WORKER_ROLE_PRODUCER] == []


def test_captured_producer_stops_when_the_run_is_cancelled(stub, store, engine,
                                                           llama_dir: Path) -> None:
    run = create_run(stub, llama_dir, lines(2))
    producer = make_producer(stub, store, engine, llama_dir, run, exit_when_captured=False)
    thread, result = _producing(producer)
    _wait(lambda: status(stub).prompts.get("CAPTURED", 0) == 2, "the capture")
    assert thread.is_alive()
    stub.CancelRun(cpb.CancelRunRequest(run_id=run.run_id, reason="enough"))
    thread.join(timeout=30)
    assert not thread.is_alive(), "the producer did not stop when the run was cancelled"
    assert result[0].samples_committed == 2


def test_fingerprint_mismatch_is_refused(stub, store, engine, llama_dir: Path) -> None:
    run = create_run(stub, llama_dir, lines(3))
    producer = make_producer(stub, store, engine, llama_dir, run, revision="other-weights")
    with pytest.raises(RegistrationRefused) as info:
        producer.register()
    assert f"run has {run.fingerprint}" in str(info.value)
    assert "fingerprint mismatch for run 'r1': worker has " in str(info.value)


def test_drain_commits_in_flight_and_gives_the_rest_back(stub, store, engine,
                                                         llama_dir: Path) -> None:
    run = create_run(stub, llama_dir, lines(30))
    first = make_producer(stub, store, engine, llama_dir, run, lease_batch=4)
    original = first._commit
    drained = threading.Event()

    def commit_then_drain(items):  # type: ignore[no-untyped-def]
        original(items)
        first.drain()
        drained.set()

    first._commit = commit_then_drain  # type: ignore[method-assign]
    stats = first.run()
    assert drained.is_set()
    assert 4 <= stats.samples_committed < 30
    st = status(stub)
    assert st.prompts["CAPTURED"] == stats.samples_committed
    assert st.prompts.get("LEASED", 0) == 0  # nothing held by a stopped producer
    second = make_producer(stub, store, engine, llama_dir, run).run()
    assert stats.samples_committed + second.samples_committed == 30
    assert status(stub).prompts["CAPTURED"] == 30


def test_a_dead_producers_leases_are_recaptured_once(stub, store, engine,
                                                     llama_dir: Path) -> None:
    run = create_run(stub, llama_dir, lines(6), lease_seconds=1.5, heartbeat_seconds=0.5)
    ghost = stub.RegisterWorker(cpb.RegisterWorkerRequest(
        run_id="r1", role=common_pb2.WORKER_ROLE_PRODUCER, fingerprint=run.fingerprint,
        identity="ghost")).session_id
    held = stub.LeasePrompts(cpb.LeasePromptsRequest(session_id=ghost, max_prompts=3)).leases
    assert len(held) == 3  # and then it stops heartbeating, as a killed process would
    stats = make_producer(stub, store, engine, llama_dir, run).run()
    assert stats.samples_committed == 6
    st = status(stub)
    assert st.prompts["CAPTURED"] == 6 and st.prompts.get("DEAD", 0) == 0
    # The ghost's session and tokens are stale now: its late calls are refused loudly.
    with pytest.raises(grpc.RpcError) as err:
        stub.ExtendLeases(cpb.ExtendLeasesRequest(session_id=ghost, leases=[
            cpb.LeaseHandle(sample_id=held[0].sample_id, lease_token=held[0].lease_token)]))
    assert err.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)


def test_full_store_fails_prompts_retryably_until_dead(stub, engine, llama_dir: Path) -> None:
    run = create_run(stub, llama_dir, lines(2), max_attempts=2)
    tiny = MemoryStore(f"full-{uuid.uuid4().hex[:8]}", store_id="mem", capacity_bytes=1024)
    stats = make_producer(stub, tiny, engine, llama_dir, run,
                          store_full_backoff_s=0.05, store_full_wait_s=0.3).run()
    assert stats.samples_committed == 0
    assert stats.prompts_failed == 4  # 2 prompts x max_attempts
    assert status(stub).prompts["DEAD"] == 2


def test_full_store_waits_for_room(stub, engine, llama_dir: Path) -> None:
    run = create_run(stub, llama_dir, lines(3), lease_seconds=30)
    name = f"room-{uuid.uuid4().hex[:8]}"
    filler = MemoryStore(name, store_id="mem")
    filler.put_sample("other", "x:e0", 0, {"blob": torch.zeros(4 << 20, dtype=torch.uint8)})
    store = MemoryStore(name, store_id="mem", capacity_bytes=(4 << 20) + (1 << 20))
    threading.Timer(0.5, lambda: filler.remove(["mem/other/x:e0/g0/blob"])).start()
    stats = make_producer(stub, store, engine, llama_dir, run, lease_batch=3).run()
    assert stats.samples_committed == 3 and stats.prompts_failed == 0


class _BrokenStore(MemoryStore):
    """A store whose writes fail with a bug, not a store error."""

    def put_sample(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("disk on fire")


def test_a_failing_stage_stops_the_loop_and_gives_leases_back(stub, engine,
                                                              llama_dir: Path) -> None:
    run = create_run(stub, llama_dir, lines(12))
    broken = _BrokenStore(f"broken-{uuid.uuid4().hex[:8]}", store_id="mem")
    with pytest.raises(RuntimeError, match="disk on fire"):
        make_producer(stub, broken, engine, llama_dir, run, lease_batch=2).run()
    st = status(stub)
    assert st.prompts.get("LEASED", 0) == st.prompts.get("CAPTURED", 0) == 0
    assert st.prompts.get("DEAD", 0) == 0
    assert st.prompts["PENDING"] == 12


class _OutageEngine:
    """Stops the coordinator during the first capture, so the commit meets the outage."""

    def __init__(self, inner, stop) -> None:  # type: ignore[no-untyped-def]
        self._inner, self._stop = inner, stop
        self.aux_layer_ids, self.name, self.device = inner.aux_layer_ids, inner.name, inner.device
        self.plan = inner.plan

    def capture(self, batch):  # type: ignore[no-untyped-def]
        if self._stop is not None:
            self._stop()
            self._stop = None
        return self._inner.capture(batch)


def test_producer_waits_out_a_coordinator_restart(sqlite_url: str, store, engine,
                                                 llama_dir: Path) -> None:
    from coordinator.server import CoordinatorConfig, CoordinatorProcess
    from services.api import coordinator_pb2_grpc
    from services.rpc.client import open_channel
    from services.rpc.server import ServerConfig

    def start(listen: str) -> CoordinatorProcess:
        return CoordinatorProcess(CoordinatorConfig(
            db_url=sqlite_url, server=ServerConfig(listen=listen), reap_seconds=0.1))

    procs = [start("127.0.0.1:0")]
    port = procs[0].port
    channel = open_channel(f"127.0.0.1:{port}")
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    handler = RetryCounter()
    logging.getLogger("producer.worker").addHandler(handler)
    try:
        run = create_run(stub, llama_dir, lines(6), heartbeat_seconds=5)
        producer = make_producer(stub, store, _OutageEngine(engine, lambda: procs[0].stop(0)),
                                 llama_dir, run, lease_batch=2)
        result: list[object] = []
        worker = threading.Thread(target=lambda: result.append(producer.run()), daemon=True)
        worker.start()
        # More retries than the channel's own policy makes: the producer outlived it.
        for _ in range(6):
            assert handler.seen.acquire(timeout=60), "the producer did not retry"
        assert worker.is_alive() and not result
        procs.append(start(f"127.0.0.1:{port}"))
        worker.join(timeout=120)
        assert result and isinstance(result[0], ProducerStats), result
        assert result[0].samples_committed == 6
        st = status(stub)
        assert st.prompts["CAPTURED"] == 6
        assert st.prompts.get("PENDING", 0) == st.prompts.get("LEASED", 0) == 0
    finally:
        logging.getLogger("producer.worker").removeHandler(handler)
        channel.close()
        procs[-1].stop(0.5)
