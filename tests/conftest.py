"""Fixtures shared by every test: databases (SQLite file, PostgreSQL) and run factories."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

PG_ADMIN_URL = os.environ.get(
    "DRAFTFLOW_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


class ManualClock:
    """A clock tests move by hand: ``clock.advance(30)``."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RetryCounter(logging.Handler):
    """Counts retries of coordinator calls logged as action ``coordinator_retry``."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Semaphore(0)

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "action", None) == "coordinator_retry":
            self.seen.release()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def _pg_admin():  # type: ignore[no-untyped-def]
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        engine.dispose()
        message = f"PostgreSQL is unreachable at {PG_ADMIN_URL}: {exc}"
        if IN_CI:
            pytest.fail(message + " (CI requires it)")
        pytest.skip(message)
    return engine


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """A migrated template database for this test run; dropped at the end."""
    from coordinator import db

    admin = _pg_admin()
    name = f"draftflow_tmpl_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    engine = db.make_engine(url)
    db.migrate(engine)
    engine.dispose()
    yield name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """A fresh PostgreSQL database, cloned from the migrated template, per test."""
    admin = _pg_admin()
    name = f"draftflow_t_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"'))
    yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path) -> str:  # type: ignore[no-untyped-def]
    return f"sqlite:///{tmp_path / 'coordinator.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A tiny Llama target directory (config, weights, tokenizer), built once per session."""
    from services.tiny_model import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("target") / "tiny", num_layers=8,
                             hidden_size=64)


@pytest.fixture
def coordinator(sqlite_url: str):  # type: ignore[no-untyped-def]
    """A real coordinator on a SQLite file, serving on a free loopback port."""
    from coordinator.server import CoordinatorConfig, CoordinatorProcess
    from services.rpc.server import ServerConfig

    proc = CoordinatorProcess(CoordinatorConfig(
        db_url=sqlite_url, server=ServerConfig(listen="127.0.0.1:0"), reap_seconds=0.1))
    yield proc
    proc.stop(grace=0.5)


@pytest.fixture
def stub(coordinator):  # type: ignore[no-untyped-def]
    """A CoordinatorService client of the ``coordinator`` fixture."""
    from services.api import coordinator_pb2_grpc
    from services.rpc.client import open_channel

    channel = open_channel(f"127.0.0.1:{coordinator.port}")
    yield coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    channel.close()
