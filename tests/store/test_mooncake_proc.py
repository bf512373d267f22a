"""Starting Mooncake processes: distinct ports, and start-up failures that say why."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from services.store import StoreUnavailable
from services.store.mooncake_proc import MasterHandle, free_ports, start_holder, start_master


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(64)
    assert len(set(ports)) == 64
    for port in ports[:8]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_master_ports_are_distinct(mooncake_master: MasterHandle):
    # One port for RPC and metrics gives a master whose health answers but which clients
    # cannot join.
    assert mooncake_master.rpc_port != mooncake_master.metrics_port
    assert mooncake_master.serving()


def test_master_on_a_taken_rpc_port_fails_with_its_exit_code():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        expected = rf"did not serve on 127.0.0.1:{port}.*exit code"
        with pytest.raises(StoreUnavailable, match=expected):
            start_master(rpc_port=port, metrics_port=free_ports(1)[0], timeout_s=10)


def test_holder_without_a_master_fails_fast_and_shows_its_log(tmp_path):
    port = free_ports(1)[0]
    log = tmp_path / "holder.log"
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as raised:
        start_holder(f"127.0.0.1:{port}", 16, timeout_s=60, log_path=log)
    assert time.monotonic() - started < 30
    message = str(raised.value)
    assert "exit code 1" in message
    assert f"Mooncake master 127.0.0.1:{port} refuses connections" in message
    assert "refuses connections" in log.read_text()


def test_holder_command_exits_1_without_a_master():
    port = free_ports(1)[0]
    done = subprocess.run(
        [sys.executable, "-m", "services.store.holder", "--master", f"127.0.0.1:{port}",
         "--segment-mb", "16"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "start mooncake_master or fix --master" in done.stderr
