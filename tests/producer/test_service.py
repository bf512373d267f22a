"""ProducerService over a real socket: status, drain, health, reflection (grpcurl), metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from producer.service import ProducerConfig, ProducerProcess
from producer.worker import WorkerConfig
from services.api import producer_pb2, producer_pb2_grpc
from services.rpc.server import ServerConfig
from tests.producer.helpers import create_run, lines, status

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")


def test_status_drain_health_and_metrics(coordinator, stub, llama_dir: Path) -> None:
    run = create_run(stub, llama_dir, lines(200))
    proc = ProducerProcess(ProducerConfig(
        coordinator=f"127.0.0.1:{coordinator.port}", run_id=run.run_id,
        store_url=f"memory://svc-{uuid.uuid4().hex[:8]}?store_id=mem", device="cpu",
        worker=WorkerConfig(run_id=run.run_id, identity="svc-test", lease_batch=2,
                            exit_when_captured=True),
        server=ServerConfig(listen="127.0.0.1:0"), metrics_port=0))
    try:
        target = f"127.0.0.1:{proc.port}"
        with grpc.insecure_channel(target) as ch:
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            svc = producer_pb2_grpc.ProducerServiceStub(ch)
            st = svc.GetStatus(producer_pb2.ProducerGetStatusRequest())
            assert (st.run_id, st.engine, st.device) == ("r1", "hf", "cpu")
            assert st.session_id == proc.producer.session_id and not st.draining
            assert svc.Drain(producer_pb2.ProducerDrainRequest()).draining
        stats = proc.wait(timeout=120)
        assert stats is not None and stats.samples_committed < 200
        services = subprocess.run([GRPCURL, "-plaintext", target, "list"], capture_output=True,
                                  text=True, timeout=30, check=True).stdout.split()
        assert "draftflow.v1.ProducerService" in services
        out = subprocess.run([GRPCURL, "-plaintext", target,
                              "draftflow.v1.ProducerService/GetStatus"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        reply = json.loads(out)
        assert reply["draining"] is True
        # JSON leaves out zero values: a drain before the first commit has none to report.
        assert int(reply.get("samples_committed", 0)) == stats.samples_committed
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics",
                                        timeout=10).read().decode()
        assert (f'draftflow_producer_samples_committed_total{{run_id="r1"}} '
                f"{float(stats.samples_committed)}") in scrape
        assert 'draftflow_rpc_total{code="OK",method="GetStatus"}' in scrape
    finally:
        proc.stop(grace=0.5)
    st = status(stub)
    assert st.prompts["CAPTURED"] == stats.samples_committed
    assert st.prompts.get("LEASED", 0) == 0
    assert st.prompts["PENDING"] == 200 - stats.samples_committed
