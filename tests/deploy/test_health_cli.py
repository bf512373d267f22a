"""``draftflow health`` against a real server over a real socket: the compose healthcheck."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from draftflow.cli import main
from services.rpc.server import RunningServer, ServerConfig, create_server


@pytest.fixture
def server() -> Iterator[RunningServer]:
    running = create_server(ServerConfig(listen="127.0.0.1:0"), lambda s: [])
    yield running
    running.stop(grace=0)


def test_serving_server_exits_zero(server: RunningServer, capsys: pytest.CaptureFixture) -> None:
    assert main(["health", f"127.0.0.1:{server.port}"]) == 0
    assert capsys.readouterr().out.strip() == f"127.0.0.1:{server.port}: SERVING"


def test_not_serving_server_exits_one(server: RunningServer,
                                      capsys: pytest.CaptureFixture) -> None:
    server.set_serving(False)
    assert main(["health", f"127.0.0.1:{server.port}"]) == 1
    assert f"127.0.0.1:{server.port}: NOT_SERVING;" in capsys.readouterr().err


def test_unknown_service_exits_one(server: RunningServer, capsys: pytest.CaptureFixture) -> None:
    assert main(["health", f"127.0.0.1:{server.port}", "--service", "no.such.Service"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_health_is_open_when_the_server_requires_a_token() -> None:
    running = create_server(ServerConfig(listen="127.0.0.1:0", auth_token="s3cret"), lambda s: [])
    try:
        assert main(["health", f"127.0.0.1:{running.port}"]) == 0
    finally:
        running.stop(grace=0)


def test_unreachable_address_exits_one_through_the_real_command() -> None:
    # Bind and close a socket so the port is known to be free, then probe it.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "draftflow", "health", f"127.0.0.1:{port}", "--timeout", "2"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr
    assert "check that the service is running" in done.stderr
