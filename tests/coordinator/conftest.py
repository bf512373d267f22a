"""A real coordinator server on a free port, and its client stub."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from coordinator.server import CoordinatorConfig, CoordinatorProcess
from services.api import coordinator_pb2_grpc
from services.rpc.client import open_channel
from services.rpc.server import ServerConfig


@pytest.fixture
def server(sqlite_url: str) -> Iterator[CoordinatorProcess]:
    proc = CoordinatorProcess(CoordinatorConfig(
        db_url=sqlite_url, server=ServerConfig(listen="127.0.0.1:0"), reap_seconds=0.2))
    yield proc
    proc.stop(grace=0.5)


@pytest.fixture
def channel(server: CoordinatorProcess) -> Iterator[grpc.Channel]:
    ch = open_channel(f"127.0.0.1:{server.port}")
    yield ch
    ch.close()


@pytest.fixture
def stub(channel: grpc.Channel) -> coordinator_pb2_grpc.CoordinatorServiceStub:
    return coordinator_pb2_grpc.CoordinatorServiceStub(channel)
