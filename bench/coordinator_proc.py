"""Start `draftflow coordinator` as its own process for a benchmark, and wait until it serves."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.store.mooncake_proc import free_port

ROOT = Path(__file__).resolve().parent.parent


def start_coordinator(db_url: str) -> tuple[subprocess.Popen[bytes], int]:
    """The coordinator on ``db_url`` (sqlite:///... or postgresql+psycopg://...) and its port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "draftflow", "--log-level", "WARNING", "coordinator",
         "--db", db_url, "--listen", f"127.0.0.1:{port}", "--metrics-port", "-1"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        while True:
            try:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                             timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, port
            except grpc.RpcError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("the coordinator did not start")
            time.sleep(0.1)
