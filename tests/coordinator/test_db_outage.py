"""A database that stops answering, seen through the coordinator's gRPC API: clients get
UNAVAILABLE with a message that names neither the database nor its driver, and the coordinator
serves again as soon as the database is back, without a restart."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from coordinator.server import CoordinatorConfig, CoordinatorProcess
from services.api import common_pb2, coordinator_pb2_grpc
from services.api import coordinator_pb2 as cpb
from services.rpc.client import open_channel
from services.rpc.server import REASON_KEY, ServerConfig
from tests.coordinator import helpers as h
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.postgres


@pytest.fixture
def proxied(pg_url: str) -> Iterator[tuple[TcpProxy, CoordinatorProcess, object]]:
    url = make_url(pg_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    via = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    proc = CoordinatorProcess(CoordinatorConfig(
        db_url=via, server=ServerConfig(listen="127.0.0.1:0"), reap_seconds=0.1))
    channel = open_channel(f"127.0.0.1:{proc.port}")
    yield proxy, proc, channel
    channel.close()
    proc.stop(grace=0.5)
    proxy.close()


def test_database_cut_is_unavailable_without_details_then_served_again(proxied) -> None:  # type: ignore[no-untyped-def]
    proxy, _, channel = proxied
    stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    config = h.run_config()
    stub.CreateRun(cpb.CreateRunRequest(run_id="r1", config=config, dataset_lines=h.dataset(4),
                                        vocab_map=h.vocab_map()))
    sid = stub.RegisterWorker(cpb.RegisterWorkerRequest(
        run_id="r1", role=common_pb2.WORKER_ROLE_PRODUCER, fingerprint=h.fingerprint(config),
        identity="test")).session_id

    proxy.cut()
    calls = {
        "GetRunStatus": lambda: stub.GetRunStatus(cpb.GetRunStatusRequest(run_id="r1")),
        "LeasePrompts": lambda: stub.LeasePrompts(cpb.LeasePromptsRequest(
            session_id=sid, max_prompts=2)),
        "Heartbeat": lambda: stub.Heartbeat(cpb.HeartbeatRequest(session_id=sid)),
        "ListRuns": lambda: stub.ListRuns(cpb.ListRunsRequest()),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.RpcError) as err:
            call()
        e = err.value
        assert e.code() == grpc.StatusCode.UNAVAILABLE, (name, e.code(), e.details())
        assert e.details().startswith("the coordinator's database is unavailable"), e.details()
        for leak in ("127.0.0.1", str(proxy.port), "5432", "psycopg", "postgres", "connection"):
            assert leak not in e.details().lower(), (name, e.details())
        assert (REASON_KEY, "DATABASE_UNAVAILABLE") in tuple(e.trailing_metadata()), name

    proxy.restore()
    status = stub.GetRunStatus(cpb.GetRunStatusRequest(run_id="r1")).status
    assert status.prompts["PENDING"] == 4
    leases = stub.LeasePrompts(cpb.LeasePromptsRequest(session_id=sid, max_prompts=2)).leases
    assert len(leases) == 2
    # The reaper's next database check reports the coordinator healthy again.
    health = health_pb2_grpc.HealthStub(channel)
    while health.Check(health_pb2.HealthCheckRequest()).status != \
            health_pb2.HealthCheckResponse.SERVING:
        time.sleep(0.05)
