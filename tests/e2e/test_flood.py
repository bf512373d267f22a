"""Unauthenticated clients against token-protected servers, every role its own process: a
hundred idle health ``Watch`` and reflection streams on the coordinator, each producer and the
trainer. Each is refused at once, authenticated work and health checks go on being answered,
and the run finishes with exact accounting."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.api import producer_pb2, producer_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.rpc.client import open_channel
from tests.e2e.accounting import check_accounting
from tests.e2e.cluster import GRPCURL, Proc, RunSpec, wait_for
from tests.e2e.conftest import MakeCluster
from tests.flood import Flood

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

TOKEN = "e2e-flood-token"
STREAMS_PER_SERVER = 100


def listening(proc: Proc, role: str) -> str:
    found: list[str] = []

    def seen() -> bool:
        m = re.search(rf"{role} listening on port (\d+)", proc.log())
        if m:
            found.append(f"127.0.0.1:{m.group(1)}")
        return bool(m) or not proc.alive()

    wait_for(seen, 120, f"{proc.name} listening")
    assert found, proc.tail()
    return found[0]


def answers(name: str, addr: str) -> None:
    """Health ``Check`` without and with the token, and the role's authenticated status call."""
    for token in ("", TOKEN):
        with open_channel(addr, token=token) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=30)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    with open_channel(addr, token=TOKEN) as channel:
        if name == "trainer":
            trainer_pb2_grpc.TrainerServiceStub(channel).GetStatus(
                trainer_pb2.TrainerGetStatusRequest(), timeout=30)
        elif name.startswith("producer"):
            producer_pb2_grpc.ProducerServiceStub(channel).GetStatus(
                producer_pb2.ProducerGetStatusRequest(), timeout=30)


def flooded(servers: dict[str, str]) -> Flood:
    """Open the flood on ``servers``; every stream is refused, every role still answers."""
    flood = Flood(list(servers.values()), n=STREAMS_PER_SERVER // 2)
    flood.open()
    for name, addr in servers.items():
        answers(name, addr)
    assert flood.outcomes() == {"UNAUTHENTICATED": STREAMS_PER_SERVER * len(servers)}
    return flood


def test_idle_unauthenticated_streams_starve_no_role(make_cluster: MakeCluster,
                                                     pg_url: str) -> None:
    spec = RunSpec(prompts=40)
    cluster = make_cluster(pg_url, spec, holder_mb=64, token=TOKEN)
    # Producers first: without a trainer they stop at the high watermark and wait.
    cluster.start(producers=2, trainer=False)
    servers = {"coordinator": cluster.coordinator_addr}
    servers.update({name: listening(cluster.procs[name], "producer")
                    for name in ("producer-0", "producer-1")})
    floods = [flooded(servers)]
    out = subprocess.run([GRPCURL, "-plaintext", cluster.coordinator_addr, "list"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "Unauthenticated" in out.stderr, out
    assert cluster.status()["state"] == "RUN_STATE_ACTIVE"  # grpcurl with the token
    try:
        # Paused producers keep the trainer waiting for data, so its server is surely up.
        producers = [cluster.procs[f"producer-{i}"].process.pid for i in range(2)]
        for pid in producers:
            os.killpg(pid, signal.SIGSTOP)
        try:
            servers["trainer"] = listening(cluster.start_trainer(), "trainer")
            floods.append(flooded({"trainer": servers["trainer"]}))
        finally:
            for pid in producers:
                os.killpg(pid, signal.SIGCONT)
        floods.append(flooded(servers))  # again, held open while the run goes on
        status = cluster.wait_done()
    finally:
        for flood in floods:
            flood.close()
    check_accounting(pg_url, spec, status, cluster.out_dir)
