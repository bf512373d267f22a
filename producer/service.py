"""Wiring of the producer process: coordinator channel, store, engine, work loop, gRPC, metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from producer.engines import ENGINES, EngineConfig, EngineContext, EngineError, create_engine
from producer.worker import Producer, ProducerStats, WorkerConfig
from services.api import coordinator_pb2 as cpb
from services.api import coordinator_pb2_grpc, producer_pb2, producer_pb2_grpc
from services.logs import event
from services.metrics import REGISTRY, MetricsInterceptor, serve_metrics
from services.rpc.client import open_channel
from services.rpc.server import RunningServer, ServerConfig, create_server
from services.store import open_store
from services.store.factory import mooncake_config

log = logging.getLogger(__name__)
SERVICE_NAME = producer_pb2.DESCRIPTOR.services_by_name["ProducerService"].full_name


@dataclass
class ProducerConfig:
    """Everything a producer process needs; the CLI fills it from flags and environment."""

    coordinator: str
    """Coordinator address, HOST:PORT."""
    run_id: str
    """The run to produce samples for."""
    store_url: str
    """Feature store URL (``mooncake://MASTER:PORT?...`` or ``memory://NAME``)."""
    engine: str = "hf"
    """Capture engine name."""
    model_path: str | None = None
    """Target directory on this node; default: the run's ``target.model_path``."""
    device: str = "auto"
    dtype: str = "auto"
    token_budget: int = 8192
    sglang_urls: tuple[str, ...] = ()
    """sglang engine: running servers; empty starts SGLang in this process."""
    sglang_max_in_flight: int = 16
    """sglang engine over HTTP: most requests outstanding per server."""
    worker: WorkerConfig | None = None
    """Work-loop pacing; ``run_id`` is taken from above."""
    coordinator_token: str | None = None
    """Bearer token for the coordinator; default $DRAFTFLOW_TOKEN."""
    coordinator_ca: str | None = None
    """PEM CA to reach a coordinator serving TLS."""
    server: ServerConfig = field(default_factory=ServerConfig)
    metrics_port: int = -1
    metrics_addr: str = "127.0.0.1"


class ProducerServicer(producer_pb2_grpc.ProducerServiceServicer):
    """GetStatus and Drain over a running work loop."""

    def __init__(self, producer: Producer, engine_name: str, device: str) -> None:
        self._producer = producer
        self._engine = engine_name
        self._device = device

    def GetStatus(self, request: producer_pb2.ProducerGetStatusRequest,
                  context: grpc.ServicerContext) -> producer_pb2.ProducerGetStatusResponse:
        p = self._producer
        s = p.stats
        elapsed = max(time.monotonic() - s.started, 1e-9)
        return producer_pb2.ProducerGetStatusResponse(
            session_id=p.session_id, run_id=p.run_id, engine=self._engine, device=self._device,
            samples_per_second=s.samples_committed / elapsed,
            tokens_per_second=s.tokens_committed / elapsed,
            in_flight=s.in_flight, samples_committed=s.samples_committed,
            prompts_failed=s.prompts_failed, engine_busy_fraction=s.engine_busy_s / elapsed,
            draining=p.draining, turns_generated=s.turns_generated,
            turns_truncated=s.turns_truncated,
            samples_dropped_truncated=s.samples_dropped_truncated,
            tokens_generated=s.tokens_generated,
            generate_busy_fraction=s.generate_busy_s / elapsed,
        )

    def Drain(self, request: producer_pb2.ProducerDrainRequest,
              context: grpc.ServicerContext) -> producer_pb2.ProducerDrainResponse:
        self._producer.drain()
        return producer_pb2.ProducerDrainResponse(draining=True)


class _StatsCollector:
    """Exposes the work loop's counters on /metrics when scraped."""

    def __init__(self, producer: Producer) -> None:
        self._producer = producer

    def collect(self) -> Iterator[Any]:
        s: ProducerStats = self._producer.stats
        labels = ["run_id"]
        run = [self._producer.run_id]
        for name, doc, value in (
            ("draftflow_producer_samples_committed", "Samples committed", s.samples_committed),
            ("draftflow_producer_tokens_committed", "Tokens of committed samples",
             s.tokens_committed),
            ("draftflow_producer_prompts_failed", "Prompts failed back to the coordinator",
             s.prompts_failed),
            ("draftflow_producer_leases_lost", "Leases that went stale under this producer",
             s.leases_lost),
            ("draftflow_producer_engine_busy_seconds",
             "Seconds the engine spent generating and capturing", s.engine_busy_s),
            ("draftflow_producer_generate_seconds", "Seconds the engine spent regenerating",
             s.generate_busy_s),
            ("draftflow_producer_tokens_generated", "Tokens of regenerated responses",
             s.tokens_generated),
            ("draftflow_producer_turns_generated", "Assistant turns regenerated",
             s.turns_generated),
            ("draftflow_producer_turns_truncated",
             "Regenerated turns that hit max_new_tokens", s.turns_truncated),
        ):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(run, value)
            yield c
        g = GaugeMetricFamily("draftflow_producer_in_flight", "Leased prompts not yet done",
                              labels=labels)
        g.add_metric(run, s.in_flight)
        yield g


class ProducerProcess:
    """A running producer: ``port``, ``producer``, ``wait()``, ``stop()``.

    Loads the engine, registers with the coordinator, serves ProducerService and runs the work
    loop on a thread of its own.
    """

    def __init__(self, cfg: ProducerConfig) -> None:
        from transformers import AutoTokenizer

        self.cfg = cfg
        if cfg.engine not in ENGINES:
            raise EngineError(f"unknown capture engine {cfg.engine!r}; choose one of "
                              + ", ".join(sorted(ENGINES)))
        self._channel = open_channel(cfg.coordinator, cfg.coordinator_token, cfg.coordinator_ca)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)
        run = stub.GetRun(cpb.GetRunRequest(run_id=cfg.run_id)).run
        model_path = cfg.model_path or run.config.target.model_path
        self.store = open_store(cfg.store_url)
        if cfg.store_url.startswith("mooncake:") and not mooncake_config(cfg.store_url).segment_mb:
            log.warning(
                "this producer lends the feature store no memory (segment_mb=0): its samples "
                "go to other segments, such as a holder's; with none, every write waits for "
                "room. Add &segment_mb=N to --store to lend N MiB",
                extra=event("producer_no_segment", store=cfg.store_url))
        self.engine = create_engine(cfg.engine, EngineConfig(
            model_path=model_path, device=cfg.device, dtype=cfg.dtype,
            aux_layer_ids=tuple(run.config.capture.aux_layer_ids) or None,
            algorithm=run.config.draft.algorithm or "eagle3",
            token_budget=cfg.token_budget), EngineContext(
            store=self.store, store_url=cfg.store_url, server_urls=cfg.sglang_urls,
            max_in_flight=cfg.sglang_max_in_flight))
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        worker = cfg.worker or WorkerConfig(run_id=cfg.run_id)
        if worker.run_id != cfg.run_id:
            raise ValueError(f"worker.run_id {worker.run_id!r} != run_id {cfg.run_id!r}")
        self.producer = Producer(stub, self.store, self.engine, tokenizer, run, worker)
        self.producer.register()
        servicer = ProducerServicer(self.producer, self.engine.name, str(self.engine.device))
        cfg.server.extra_interceptors = [MetricsInterceptor(), *cfg.server.extra_interceptors]

        def register(server: grpc.Server) -> list[str]:
            producer_pb2_grpc.add_ProducerServiceServicer_to_server(servicer, server)
            return [SERVICE_NAME]

        self.running: RunningServer = create_server(cfg.server, register)
        self.port = self.running.port
        self._collector = _StatsCollector(self.producer)
        REGISTRY.register(self._collector)  # type: ignore[arg-type]
        self.metrics_port = serve_metrics(cfg.metrics_port, cfg.metrics_addr)
        self._result: ProducerStats | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="producer-capture", daemon=True)
        self._thread.start()
        log.info("producer serving", extra=event(
            "producer_started", run_id=cfg.run_id, port=self.port, metrics_port=self.metrics_port))

    def _run(self) -> None:
        try:
            self._result = self.producer.run()
        except BaseException as exc:
            self._error = exc
            log.exception("producer failed", extra=event("producer_failed",
                                                         run_id=self.cfg.run_id))

    def wait(self, timeout: float | None = None) -> ProducerStats | None:
        """Block until the work loop ends; re-raise its error. None if still running."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            return None
        if self._error is not None:
            raise self._error
        return self._result

    def stop(self, grace: float = 5.0) -> None:
        """Drain (finish and commit in-flight work, give leases back), then shut down."""
        self.producer.drain()
        self._thread.join()
        self.running.stop(grace)
        REGISTRY.unregister(self._collector)  # type: ignore[arg-type]
        self.engine.close()
        self.store.close()
        self._channel.close()
