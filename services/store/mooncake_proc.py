"""Start and stop Mooncake processes: the master, and holders that lend memory to the pool.

Mooncake's ports (master RPC, metrics, transfer ports) have no authentication: bind them to
addresses of a private network only.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.logs import event
from services.store.base import StoreUnavailable
from services.store.mooncake import master_reachable

log = logging.getLogger(__name__)


def master_binary() -> str:
    """Path of ``mooncake_master``: on PATH, else the copy inside the mooncake wheel."""
    found = shutil.which("mooncake_master")
    if found:
        return found
    import mooncake

    bundled = Path(mooncake.__file__).parent / "mooncake_master"
    if bundled.exists():
        return str(bundled)
    raise FileNotFoundError(
        "mooncake_master not found; pip install draftflow[mooncake] (or put it on PATH)"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now.

    All sockets stay bound until every port is chosen: asked one at a time, the OS may hand
    out the same port twice.
    """
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class MasterHandle:
    """A running ``mooncake_master``."""

    process: subprocess.Popen[bytes]
    host: str
    rpc_port: int
    metrics_port: int
    http_metadata_port: int | None = None
    log_path: Path | None = None
    argv: list[str] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The master's RPC address, ``HOST:PORT``, as clients name it."""
        return f"{self.host}:{self.rpc_port}"

    @property
    def metadata(self) -> str:
        """The metadata setting clients should use with this master."""
        if self.http_metadata_port is None:
            return "P2PHANDSHAKE"
        return f"http://{self.host}:{self.http_metadata_port}/metadata"

    def url(self, store_id: str = "draftflow", **params: object) -> str:
        """A ``mooncake://`` store URL for this master, e.g. ``url("s1", segment_mb=64)``."""
        query = {"store_id": store_id, "metadata": self.metadata, **params}
        return f"mooncake://{self.address}?" + "&".join(f"{k}={v}" for k, v in query.items())

    def serving(self) -> bool:
        """True when the master answers its health endpoint as ready and accepts RPC clients."""
        health = f"http://{self.host}:{self.metrics_port}/health"
        if self.prefix:  # e.g. inside a network namespace: probe from there
            probe = [*self.prefix, sys.executable, "-m", "services.store.mooncake_proc",
                     health, self.address]
            return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
        return _ready(health, self.address)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; all keys are lost."""
        _stop(self.process, timeout_s)

    def kill(self) -> None:
        """SIGKILL: a crash, for failure tests."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self, timeout_s: float = 20.0) -> MasterHandle:
        """Start a fresh master on the same address and ports (after ``stop`` or ``kill``)."""
        return _launch(self.argv, self.host, self.rpc_port, self.metrics_port,
                       self.http_metadata_port, self.log_path, timeout_s, self.prefix)


def start_master(
    host: str = "127.0.0.1",
    rpc_port: int = 0,
    metrics_port: int = 0,
    http_metadata: bool = False,
    client_ttl_s: int = 10,
    log_path: Path | None = None,
    timeout_s: float = 20.0,
    prefix: list[str] | None = None,
    extra_args: Sequence[str] = (),
) -> MasterHandle:
    """Start ``mooncake_master`` bound to ``host`` (0 ports: free ones) and wait until it serves.

    ``extra_args``: more ``--flag=value`` arguments for the master (e.g. its lease time).

    ``prefix`` runs it under a wrapper, e.g. ``["ip", "netns", "exec", NS]``; give explicit
    ports then, since free ones are looked up here.

    ``client_ttl_s``: after this long without heartbeats a client's segment is dropped, and
    reads of keys in it turn from "transfer failed" into "no such key".
    """
    # Another process may take a port chosen here before the master binds it: then start
    # again on fresh ports. Ports the caller named are kept, so there is nothing to retry.
    attempts = 1 if rpc_port and metrics_port else 3
    for attempt in range(attempts):
        chosen = iter(free_ports((not rpc_port) + (not metrics_port) + http_metadata, host))
        rpc = rpc_port or next(chosen)
        metrics = metrics_port or next(chosen)
        http_port = next(chosen) if http_metadata else None
        argv = [
            master_binary(),
            f"--rpc_address={host}", f"--rpc_port={rpc}",
            f"--metrics_host={host}", f"--metrics_port={metrics}",
            f"--client_ttl={client_ttl_s}",
            "--rpc_thread_num=4",
            *extra_args,
        ]
        if http_port is not None:
            argv += [
                "--enable_http_metadata_server=true",
                f"--http_metadata_server_host={host}", f"--http_metadata_server_port={http_port}",
            ]
            log.warning(
                "the Mooncake HTTP metadata server listens on every interface (port %d), not "
                "only %s: this Mooncake build ignores --http_metadata_server_host. Firewall the "
                "port, or use metadata=P2PHANDSHAKE, which needs no metadata server",
                http_port, host, extra=event("metadata_server_listens_everywhere",
                                             host=host, port=http_port))
        try:
            return _launch(argv, host, rpc, metrics, http_port, log_path, timeout_s, prefix or [])
        except StoreUnavailable:
            if attempt + 1 == attempts:
                raise
    raise AssertionError("unreachable")


def _launch(
    argv: list[str], host: str, rpc_port: int, metrics_port: int, http_port: int | None,
    log_path: Path | None, timeout_s: float, prefix: list[str],
) -> MasterHandle:
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen([*prefix, *argv], stdout=out, stderr=subprocess.STDOUT)
    handle = MasterHandle(process, host, rpc_port, metrics_port, http_port, log_path, argv, prefix)
    deadline = time.monotonic() + timeout_s
    while not handle.serving():
        if process.poll() is not None or time.monotonic() > deadline:
            handle.stop()
            where = f"; see {log_path}" if log_path else ""
            raise StoreUnavailable(
                f"mooncake_master did not serve on {host}:{rpc_port} within {timeout_s} s "
                f"(exit code {process.returncode}){where}"
            )
        time.sleep(0.05)
    return handle


@dataclass
class HolderHandle:
    """A process that mounts a segment so stored data outlives the processes that wrote it."""

    process: subprocess.Popen[str]
    segment: str

    def stop(self, timeout_s: float = 10.0) -> None:
        _stop(self.process, timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_holder(
    master: str,
    segment_mb: int,
    local_host: str = "127.0.0.1",
    metadata: str = "P2PHANDSHAKE",
    protocol: str = "tcp",
    device: str = "",
    timeout_s: float = 30.0,
    log_path: Path | None = None,
) -> HolderHandle:
    """Start ``python -m services.store.holder`` and wait until its segment is mounted.

    Its log goes to ``log_path``, or to a temporary file that lives as long as the holder.
    """
    argv = [
        sys.executable, "-m", "services.store.holder", "--master", master,
        "--segment-mb", str(segment_mb), "--local", local_host, "--metadata", metadata,
        "--protocol", protocol, "--device", device,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # Mooncake logs to stderr; keep it so a failed start can say why.
    errors = open(log_path, "a+") if log_path else tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    line = ""
    # The holder prints "ready SEGMENT" once mounted; a dead holder closes stdout.
    while not line.startswith("ready ") and time.monotonic() < deadline:
        if not select.select([process.stdout], [], [], 0.2)[0]:
            continue
        line = process.stdout.readline()
        if not line:
            break
    if not line.startswith("ready "):
        _stop(process, 5.0)
        errors.flush()
        errors.seek(0)
        tail = "".join(errors.readlines()[-5:]).strip()
        errors.close()
        raise StoreUnavailable(
            f"holder did not mount {segment_mb} MiB at {master} within {timeout_s} s "
            f"(exit code {process.returncode}); check the master address and local_host"
            + (f"; its last log lines:\n{tail}" if tail else "")
        )
    errors.close()
    return HolderHandle(process, line.split()[1])


def _ready(health_url: str, rpc_address: str) -> bool:
    # The health endpoint is served apart from RPC: check that both answer.
    try:
        with urllib.request.urlopen(health_url, timeout=1.0) as reply:
            if not json.loads(reply.read()).get("service_ready"):
                return False
    except (OSError, ValueError):
        return False
    return master_reachable(rpc_address, 1.0)


def _stop(process: subprocess.Popen, timeout_s: float) -> None:  # type: ignore[type-arg]
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


if __name__ == "__main__":
    # ``python -m services.store.mooncake_proc HEALTH_URL RPC_ADDRESS``: exit 0 when ready.
    sys.exit(0 if _ready(sys.argv[1], sys.argv[2]) else 1)
