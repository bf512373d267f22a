"""The coordinator over real gRPC sockets: the whole protocol, auth, limits, health, grpcurl."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text

from coordinator.server import CoordinatorConfig, CoordinatorProcess
from draftflow.run_cli import create_run, stream_parts
from services.api import common_pb2, coordinator_pb2_grpc
from services.api import coordinator_pb2 as cpb
from services.rpc.client import open_channel
from services.rpc.server import ServerConfig
from tests.conftest import PG_ADMIN_URL
from tests.coordinator import helpers as h
from tests.flood import Flood

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def create(stub: coordinator_pb2_grpc.CoordinatorServiceStub, n: int = 4, **cfg: object
           ) -> cpb.RunConfig:
    config = h.run_config(**cfg)
    stub.CreateRun(cpb.CreateRunRequest(run_id="r1", config=config, dataset_lines=h.dataset(n),
                                        vocab_map=h.vocab_map()))
    return config


def register(stub, config, role: int) -> str:  # type: ignore[no-untyped-def]
    group = "g" if role == common_pb2.WORKER_ROLE_TRAINER else ""
    return stub.RegisterWorker(cpb.RegisterWorkerRequest(
        run_id="r1", role=role, fingerprint=h.fingerprint(config), identity="test",
        trainer_group=group)).session_id


def test_full_protocol_over_grpc(stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    config = create(stub, n=4, accum=2)
    pid = register(stub, config, common_pb2.WORKER_ROLE_PRODUCER)
    leases = stub.LeasePrompts(cpb.LeasePromptsRequest(session_id=pid, max_prompts=8)).leases
    res = stub.CommitSamples(cpb.CommitSamplesRequest(
        session_id=pid, samples=[h.commit(le, "r1") for le in leases]))
    assert [r.status for r in res.results] == [cpb.COMMIT_STATUS_ACCEPTED] * 4
    tid = register(stub, config, common_pb2.WORKER_ROLE_TRAINER)
    stream = stub.StreamSteps(cpb.StreamStepsRequest(session_id=tid, rank=0, from_step=1,
                                                     prefetch=1))
    seen = []
    for msg in stream:
        if msg.end_of_data:
            assert msg.tail == cpb.TAIL_STATE_END_OF_DATA
            break
        seen.extend(r.sample_id for r in msg.refs)
        stub.CommitStep(cpb.CommitStepRequest(session_id=tid, step=msg.step, loss=1.0))
    assert sorted(seen) == sorted(le.sample_id for le in leases)
    status = stub.GetRunStatus(cpb.GetRunStatusRequest(run_id="r1")).status
    assert status.state == cpb.RUN_STATE_COMPLETED
    assert status.samples["TRAINED"] == 4 and status.last_committed_step == 2


def test_an_idle_producer_is_answered_as_soon_as_a_sample_is_lost(
        stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    """With nothing to capture, LeasePrompts holds its empty answer (up to retry_after) and
    hands out a lost sample's recapture the moment it is reported, not one poll later."""
    config = h.run_config(micro=2)
    config.watermark.retry_after_seconds = 60.0
    stub.CreateRun(cpb.CreateRunRequest(run_id="r1", config=config, dataset_lines=h.dataset(2),
                                        vocab_map=h.vocab_map()))
    pid = register(stub, config, common_pb2.WORKER_ROLE_PRODUCER)
    leases = stub.LeasePrompts(cpb.LeasePromptsRequest(session_id=pid, max_prompts=8)).leases
    stub.CommitSamples(cpb.CommitSamplesRequest(
        session_id=pid, samples=[h.commit(le, "r1") for le in leases]))
    tid = register(stub, config, common_pb2.WORKER_ROLE_TRAINER)
    stream = stub.StreamSteps(cpb.StreamStepsRequest(session_id=tid, rank=0, from_step=1,
                                                     prefetch=1))
    lost = next(iter(stream)).refs[0]
    answer: dict[str, cpb.LeasePromptsResponse] = {}
    waiting = threading.Thread(target=lambda: answer.update(reply=stub.LeasePrompts(
        cpb.LeasePromptsRequest(session_id=pid, max_prompts=8), timeout=120)))
    waiting.start()
    time.sleep(0.5)
    assert waiting.is_alive(), answer  # every prompt is captured: the answer is held
    stub.ReportLost(cpb.ReportLostRequest(session_id=tid, sample_id=lost.sample_id,
                                          generation=lost.generation, reason="test"))
    waiting.join(timeout=60)
    stream.cancel()
    reply = answer["reply"]
    assert [(le.sample_id, le.generation) for le in reply.leases] == [(lost.sample_id, 1)]


def test_errors_map_to_status_codes_with_messages(
        stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.GetRunStatus(cpb.GetRunStatusRequest(run_id="missing"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == (
        "run 'missing' does not exist; list runs with `draftflow run list`")
    with pytest.raises(grpc.RpcError) as err:
        stub.GetRunStatus(cpb.GetRunStatusRequest(run_id="bad id!"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    config = create(stub)
    with pytest.raises(grpc.RpcError) as err:
        stub.RegisterWorker(cpb.RegisterWorkerRequest(
            run_id="r1", role=common_pb2.WORKER_ROLE_PRODUCER, fingerprint="nope"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "nope" in err.value.details() and h.fingerprint(config) in err.value.details()
    tid = register(stub, config, common_pb2.WORKER_ROLE_TRAINER)
    stream = stub.StreamSteps(cpb.StreamStepsRequest(session_id=tid, rank=5, from_step=1))
    with pytest.raises(grpc.RpcError) as err:
        next(iter(stream))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rank: 5 is outside [0, 1)" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stub.CommitStep(cpb.CommitStepRequest(session_id=tid, step=3))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_oversized_message_is_rejected(coordinator: CoordinatorProcess) -> None:
    ch = grpc.insecure_channel(f"127.0.0.1:{coordinator.port}",
                               options=[("grpc.max_send_message_length", 200 * 2**20)])
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateRun(cpb.CreateRunRequest(run_id="big", dataset_lines=["x" * (65 * 2**20)]))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ch.close()
    target = f"127.0.0.1:{coordinator.port}"
    stub2 = coordinator_pb2_grpc.CoordinatorServiceStub(open_channel(target))
    assert stub2.ListRuns(cpb.ListRunsRequest()).runs == []


def test_dataset_bigger_than_a_message_is_streamed(sqlite_url: str) -> None:
    # A 1 MiB message limit stands in for 64 MiB: the same code path, a small dataset.
    proc = CoordinatorProcess(CoordinatorConfig(db_url=sqlite_url, server=ServerConfig(
        listen="127.0.0.1:0", max_message_bytes=1 << 20)))
    try:
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(open_channel(f"127.0.0.1:{proc.port}"))
        filler = "word " * 2000  # ~10 KB per row, 300 rows: ~3 MiB in all
        lines = [json.dumps({"conversations": [
            {"from": "human", "value": f"question {i}: {filler}"},
            {"from": "gpt", "value": f"answer {i}"}]}) for i in range(300)]
        lines[150] = "not json"
        request = cpb.CreateRunRequest(run_id="big", config=h.run_config(),
                                       dataset_lines=lines, vocab_map=h.vocab_map())
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateRun(request)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        parts = list(stream_parts(request, chunk_bytes=256 << 10))
        assert len(parts) > 10 and all(p.ByteSize() < 1 << 20 for p in parts)
        assert [line for p in parts for line in p.dataset_lines] == lines
        done = create_run(stub, request, chunk_bytes=256 << 10)
        assert done.run.num_prompts == 299
        assert [(b.line, b.reason[:9]) for b in done.bad_rows] == [(151, "not valid")]
        # Streamed again, the same run answers as before (idempotent), as CreateRun does.
        again = create_run(stub, request, chunk_bytes=256 << 10)
        assert again.run.fingerprint == done.run.fingerprint
    finally:
        proc.stop(0.5)


def test_streamed_create_validates_every_message(
        stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    config, vocab = h.run_config(), h.vocab_map()
    cases = [
        ([], "the stream was empty"),
        ([cpb.CreateRunStreamRequest(run_id="s", config=config, vocab_map=vocab),
          cpb.CreateRunStreamRequest(run_id="s", dataset_lines=h.dataset(2))],
         "message 2: only the first message names the run"),
        ([cpb.CreateRunStreamRequest(dataset_lines=h.dataset(2))], "run_id"),
        ([cpb.CreateRunStreamRequest(run_id="s", config=config, vocab_map=vocab)],
         "dataset_lines: the dataset is empty"),
    ]
    for parts, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.CreateRunStream(iter(parts))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert message in err.value.details()
    assert stub.ListRuns(cpb.ListRunsRequest()).runs == []


def test_bearer_token_required_but_health_stays_open(sqlite_url: str) -> None:
    proc = CoordinatorProcess(CoordinatorConfig(
        db_url=sqlite_url, server=ServerConfig(listen="127.0.0.1:0", auth_token="s3cret")))
    try:
        target = f"127.0.0.1:{proc.port}"
        for token in (None, "wrong"):
            ch = open_channel(target, token=token or "")
            with pytest.raises(grpc.RpcError) as err:
                coordinator_pb2_grpc.CoordinatorServiceStub(ch).ListRuns(cpb.ListRunsRequest())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            stream = coordinator_pb2_grpc.CoordinatorServiceStub(ch).WatchRunStatus(
                cpb.WatchRunStatusRequest(run_id="r1"))
            with pytest.raises(grpc.RpcError) as err:
                next(iter(stream))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:  # a client stream is guarded too
                coordinator_pb2_grpc.CoordinatorServiceStub(ch).CreateRunStream(iter([
                    cpb.CreateRunStreamRequest(run_id="r1", config=h.run_config(),
                                               dataset_lines=h.dataset(1),
                                               vocab_map=h.vocab_map())]))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        ok = open_channel(target, token="s3cret")
        assert coordinator_pb2_grpc.CoordinatorServiceStub(ok).ListRuns(
            cpb.ListRunsRequest()).runs == []
        created = create_run(coordinator_pb2_grpc.CoordinatorServiceStub(ok), cpb.CreateRunRequest(
            run_id="r1", config=h.run_config(), dataset_lines=h.dataset(2),
            vocab_map=h.vocab_map()))
        assert created.run.num_prompts == 2
    finally:
        proc.stop(0.5)


def test_listening_beyond_loopback_needs_a_token(sqlite_url: str) -> None:
    with pytest.raises(ValueError, match="without authentication"):
        CoordinatorProcess(CoordinatorConfig(
            db_url=sqlite_url, server=ServerConfig(listen="0.0.0.0:0")))


@pytest.mark.postgres
def test_health_is_not_serving_while_the_database_is_unreachable(pg_url: str) -> None:
    proc = CoordinatorProcess(CoordinatorConfig(
        db_url=pg_url, server=ServerConfig(listen="127.0.0.1:0"), reap_seconds=0.1))
    try:
        health = health_pb2_grpc.HealthStub(open_channel(f"127.0.0.1:{proc.port}"))
        req = health_pb2.HealthCheckRequest(service="draftflow.v1.CoordinatorService")
        assert health.Check(req).status == health_pb2.HealthCheckResponse.SERVING
        name = pg_url.rsplit("/", 1)[1]
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:  # the database disappears under the coordinator
            conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        deadline = time.monotonic() + 10
        while health.Check(req).status == health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health never went NOT_SERVING"
            time.sleep(0.1)
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        deadline = time.monotonic() + 10
        while health.Check(req).status != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health never came back"
            time.sleep(0.1)
    finally:
        proc.stop(0.5)


def test_watch_run_status_streams_until_completion(
        stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    config = create(stub, n=1)
    updates = []

    def watch() -> None:
        for msg in stub.WatchRunStatus(cpb.WatchRunStatusRequest(run_id="r1",
                                                                 interval_seconds=0.1)):
            updates.append(msg.status)

    t = threading.Thread(target=watch)
    t.start()
    pid = register(stub, config, common_pb2.WORKER_ROLE_PRODUCER)
    lease = stub.LeasePrompts(cpb.LeasePromptsRequest(session_id=pid, max_prompts=1)).leases[0]
    stub.CommitSamples(cpb.CommitSamplesRequest(session_id=pid, samples=[h.commit(lease, "r1")]))
    tid = register(stub, config, common_pb2.WORKER_ROLE_TRAINER)
    for msg in stub.StreamSteps(cpb.StreamStepsRequest(session_id=tid, rank=0, from_step=1)):
        if msg.end_of_data:
            break
        stub.CommitStep(cpb.CommitStepRequest(session_id=tid, step=msg.step))
    t.join(timeout=10)
    assert not t.is_alive()
    assert updates[0].prompts["PENDING"] == 1
    assert updates[-1].state == cpb.RUN_STATE_COMPLETED


def _grpcurl(*args: str) -> str:
    out = subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_grpcurl_lists_services_and_reads_status(
        coordinator: CoordinatorProcess, stub: coordinator_pb2_grpc.CoordinatorServiceStub
) -> None:
    target = f"127.0.0.1:{coordinator.port}"
    services = _grpcurl(target, "list").split()
    assert "draftflow.v1.CoordinatorService" in services
    assert "grpc.health.v1.Health" in services
    methods = _grpcurl(target, "list", "draftflow.v1.CoordinatorService").split()
    assert "draftflow.v1.CoordinatorService.StreamSteps" in methods
    create(stub, n=3, epochs=2)
    status = json.loads(_grpcurl("-d", '{"run_id": "r1"}', target,
                                 "draftflow.v1.CoordinatorService/GetRunStatus"))["status"]
    assert status["run_id"] == "r1"
    assert status["state"] == "RUN_STATE_ACTIVE"
    assert status["prompts"]["PENDING"] == "6"
    out = subprocess.run([GRPCURL, "-plaintext", "-d", '{"run_id": "nope"}', target,
                          "draftflow.v1.CoordinatorService/GetRunStatus"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "NotFound" in out.stderr


def test_tls_with_token(sqlite_url: str, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    proc = CoordinatorProcess(CoordinatorConfig(db_url=sqlite_url, server=ServerConfig(
        listen="127.0.0.1:0", auth_token="s3cret", tls_cert=str(cert), tls_key=str(key))))
    try:
        target = f"localhost:{proc.port}"
        ok = coordinator_pb2_grpc.CoordinatorServiceStub(
            open_channel(target, token="s3cret", tls_ca=str(cert)))
        assert ok.ListRuns(cpb.ListRunsRequest(), timeout=10).runs == []
        plain = coordinator_pb2_grpc.CoordinatorServiceStub(open_channel(target, token="s3cret"))
        with pytest.raises(grpc.RpcError) as err:
            plain.ListRuns(cpb.ListRunsRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.stop(0.5)


def test_idle_unauthenticated_streams_cannot_starve_a_server_with_a_token(
        sqlite_url: str) -> None:
    # Four server threads, a hundred idle streams: any stream that held a thread would starve
    # the authenticated call and the health check below.
    proc = CoordinatorProcess(CoordinatorConfig(db_url=sqlite_url, server=ServerConfig(
        listen="127.0.0.1:0", auth_token="s3cret", max_workers=4)))
    flood = Flood([f"127.0.0.1:{proc.port}"], n=50)
    try:
        flood.open()
        ok = open_channel(f"127.0.0.1:{proc.port}", token="s3cret")
        assert coordinator_pb2_grpc.CoordinatorServiceStub(ok).ListRuns(
            cpb.ListRunsRequest(), timeout=30).runs == []
        assert health_pb2_grpc.HealthStub(ok).Check(
            health_pb2.HealthCheckRequest(), timeout=30).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert flood.outcomes() == {"UNAUTHENTICATED": 100}
        # With the token, both streams are served as before.
        watch = health_pb2_grpc.HealthStub(ok).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        assert "draftflow.v1.CoordinatorService" in _grpcurl(
            "-H", "authorization: Bearer s3cret", f"127.0.0.1:{proc.port}", "list").split()
    finally:
        flood.close()
        proc.stop(0.5)
