"""Wiring of the coordinator process: database, manager, gRPC server, reaper, metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator import db
from coordinator.errors import from_database
from coordinator.manager import Coordinator
from coordinator.metrics import RunStatusCollector
from coordinator.servicer import CoordinatorServicer
from services.api import coordinator_pb2, coordinator_pb2_grpc
from services.logs import event
from services.metrics import REGISTRY, MetricsInterceptor, serve_metrics
from services.rpc.server import RunningServer, ServerConfig, create_server

log = logging.getLogger(__name__)
SERVICE_NAME = coordinator_pb2.DESCRIPTOR.services_by_name["CoordinatorService"].full_name


@dataclass
class CoordinatorConfig:
    """How the coordinator runs."""

    db_url: str = "sqlite:///.draftflow/coordinator.db"
    """sqlite:///PATH (embedded) or postgresql+psycopg://USER@HOST/DB."""
    server: ServerConfig = field(default_factory=ServerConfig)
    metrics_port: int = -1
    """Prometheus /metrics port; 0 picks a free one, negative disables."""
    metrics_addr: str = "127.0.0.1"
    reap_seconds: float = 1.0
    """How often silent sessions and overdue leases are expired, and the database is checked."""


class CoordinatorProcess:
    """A running coordinator: ``port``, ``manager``, ``stop()``."""

    def __init__(self, cfg: CoordinatorConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.engine = db.make_engine(cfg.db_url)
        db.migrate(self.engine)
        self.manager = Coordinator(self.engine, clock=clock)
        servicer = CoordinatorServicer(self.manager)
        cfg.server.extra_interceptors = [MetricsInterceptor(), *cfg.server.extra_interceptors]
        cfg.server.translate_error = from_database

        def register(server: object) -> list[str]:
            coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server(servicer, server)
            return [SERVICE_NAME]

        self.running: RunningServer = create_server(cfg.server, register)
        self.port = self.running.port
        if cfg.metrics_port >= 0:
            REGISTRY.register(RunStatusCollector(self.manager))
        self.metrics_port = serve_metrics(cfg.metrics_port, cfg.metrics_addr)
        self._stop = threading.Event()
        self._healthy = True
        self._thread = threading.Thread(target=self._watch, name="coordinator-reaper",
                                        daemon=True)
        self._thread.start()
        log.info("coordinator listening", extra=event(
            "coordinator_started", port=self.port, db=self.engine.url.render_as_string(),
            metrics_port=self.metrics_port))

    def _watch(self) -> None:
        """Reap expired work; serve NOT_SERVING while the database does not answer."""
        while not self._stop.wait(self.cfg.reap_seconds):
            healthy = db.ping(self.engine)
            if healthy != self._healthy:
                self._healthy = healthy
                self.running.set_serving(healthy)
                log.log(logging.INFO if healthy else logging.ERROR, "database %s",
                        "reachable again" if healthy else "unreachable",
                        extra=event("db_health", healthy=healthy))
            if healthy:
                try:
                    self.manager.reap()
                except Exception:
                    log.exception("reaping failed", extra=event("reap_failed"))

    def stop(self, grace: float = 5.0) -> None:
        self._stop.set()
        self.running.stop(grace)
        self._thread.join(timeout=5)
        self.engine.dispose()
