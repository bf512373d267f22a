"""``TrainerService`` on rank 0: status and on-demand checkpoints, with health, reflection and
Prometheus metrics around it."""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Iterator
from typing import Any

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from services.api import trainer_pb2, trainer_pb2_grpc
from services.errors import FailedPrecondition, Unavailable
from services.logs import event
from services.metrics import REGISTRY, MetricsInterceptor, serve_metrics
from services.rpc.server import RunningServer, ServerConfig, create_server
from trainer.runner import CoordinatorRunner, TrainerStatus

log = logging.getLogger(__name__)
SERVICE_NAME = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"].full_name
DEFAULT_SAVE_WAIT_S = 600.0
"""How long SaveCheckpoint waits for the next step when the call has no deadline."""


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    """GetStatus and SaveCheckpoint over a running ``CoordinatorRunner``."""

    def __init__(self, runner: CoordinatorRunner) -> None:
        self._runner = runner

    def GetStatus(self, request: trainer_pb2.TrainerGetStatusRequest,
                  context: grpc.ServicerContext) -> trainer_pb2.TrainerGetStatusResponse:
        return self._runner.status.to_proto()

    def SaveCheckpoint(self, request: trainer_pb2.SaveCheckpointRequest,
                       context: grpc.ServicerContext) -> trainer_pb2.SaveCheckpointResponse:
        fut = self._runner.request_checkpoint()
        remaining = context.time_remaining()
        timeout = remaining if remaining is not None else DEFAULT_SAVE_WAIT_S
        try:
            step, uri = fut.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise Unavailable(
                "no training step finished in time to take the checkpoint; the trainer is "
                "probably waiting for data (see GetStatus data_wait_fraction); retry later"
            ) from None
        except RuntimeError as exc:
            raise FailedPrecondition(f"{exc}; the last checkpoint is in the coordinator's run "
                                     "status") from None
        return trainer_pb2.SaveCheckpointResponse(step=step, uri=uri)


class _StatusCollector:
    """The trainer's status as Prometheus gauges and counters, read when scraped."""

    def __init__(self, status: TrainerStatus) -> None:
        self._status = status

    def collect(self) -> Iterator[Any]:
        s = self._status
        run = [s.run_id]
        for name, doc, value in (
            ("draftflow_trainer_step", "Last optimizer step applied", s.step),
            ("draftflow_trainer_loss", "Training loss of the last step", s.loss),
            ("draftflow_trainer_samples_per_second", "Samples trained per second",
             s.samples_per_second),
            ("draftflow_trainer_data_wait_fraction", "Fraction of time spent waiting for data",
             s.data_wait_fraction),
            ("draftflow_trainer_acceptance_length", "Simulated acceptance length, last step",
             s.acceptance_length),
            ("draftflow_trainer_last_checkpoint_step", "Step of the last committed checkpoint",
             s.last_checkpoint_step),
        ):
            g = GaugeMetricFamily(name, doc, labels=["run_id"])
            g.add_metric(run, value)
            yield g
        acc = GaugeMetricFamily("draftflow_trainer_accuracy",
                                "Top-1 accuracy per unroll position, last step",
                                labels=["run_id", "position"])
        for k, value in enumerate(s.accuracies):
            acc.add_metric([s.run_id, str(k)], value)
        yield acc
        figures = GaugeMetricFamily("draftflow_trainer_metric",
                                    "Every figure the draft strategy reported, last step",
                                    labels=["run_id", "name"])
        for name, value in sorted(s.metrics.items()):
            figures.add_metric([s.run_id, name], value)
        yield figures
        for name, doc, value in (
            ("draftflow_trainer_data_wait_seconds", "Seconds spent waiting for data",
             s.data_wait_seconds),
            ("draftflow_trainer_samples_lost", "Samples reported lost or corrupt",
             s.samples_lost),
        ):
            c = CounterMetricFamily(name, doc, labels=["run_id"])
            c.add_metric(run, value)
            yield c


class TrainerServer:
    """``TrainerService`` and /metrics for a runner: ``port``, ``metrics_port``, ``stop()``."""

    def __init__(self, runner: CoordinatorRunner, server: ServerConfig,
                 metrics_port: int = -1, metrics_addr: str = "127.0.0.1") -> None:
        servicer = TrainerServicer(runner)
        server.extra_interceptors = [MetricsInterceptor(), *server.extra_interceptors]

        def register(srv: grpc.Server) -> list[str]:
            trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, srv)
            return [SERVICE_NAME]

        self.running: RunningServer = create_server(server, register)
        self.port = self.running.port
        self._collector = _StatusCollector(runner.status)
        REGISTRY.register(self._collector)  # type: ignore[arg-type]
        self.metrics_port = serve_metrics(metrics_port, metrics_addr)
        log.info("trainer serving", extra=event(
            "trainer_started", run_id=runner.cfg.run_id, port=self.port,
            metrics_port=self.metrics_port))

    def stop(self, grace: float = 5.0) -> None:
        self.running.stop(grace)
        REGISTRY.unregister(self._collector)  # type: ignore[arg-type]
