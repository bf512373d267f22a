"""Feature-store fixtures: a real mooncake_master per session, and stores on every backend."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from services.store import FeatureStore, open_store
from services.store.mooncake_proc import MasterHandle, start_master

# --- mooncake fixtures (reusable by any test package) -------------------------------------------


@pytest.fixture(scope="session")
def mooncake_master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MasterHandle]:
    """One real ``mooncake_master`` on free loopback ports for the whole session."""
    log = tmp_path_factory.mktemp("mooncake") / "master.log"
    master = start_master(log_path=log)
    yield master
    master.stop()


@pytest.fixture
def fresh_master() -> Iterator[MasterHandle]:
    """A master of this test's own, for tests that fill, kill or restart it."""
    master = start_master(client_ttl_s=2)
    yield master
    master.stop()


def mooncake_url(master: MasterHandle, store_id: str | None = None, **params: object) -> str:
    """A ``mooncake://`` URL for ``master``; a unique store_id keeps tests' keys apart."""
    return master.url(store_id or f"t{uuid.uuid4().hex[:8]}", **params)


# --- contract-suite backends ----------------------------------------------------------------
# Joining and leaving a Mooncake cluster takes seconds, so the Mooncake pair lives per session.


@pytest.fixture(scope="session")
def mooncake_pair(mooncake_master: MasterHandle) -> Iterator[tuple[FeatureStore, FeatureStore]]:
    """A writer that contributes a segment and a reader with none, on one store_id."""
    store_id = f"t{uuid.uuid4().hex[:8]}"
    writer = open_store(mooncake_url(mooncake_master, store_id, segment_mb=64, buffer_mb=32))
    reader = open_store(mooncake_url(mooncake_master, store_id, buffer_mb=32))
    yield writer, reader
    writer.close()
    reader.close()


@pytest.fixture(params=["memory", "mooncake"])
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[FeatureStore, FeatureStore]]:
    """(writer, reader) on each backend; for memory, two handles on one named store."""
    if request.param == "mooncake":
        yield request.getfixturevalue("mooncake_pair")
        return
    name = uuid.uuid4().hex[:8]
    writer, reader = open_store(f"memory://{name}"), open_store(f"memory://{name}")
    yield writer, reader
    writer.close()
    reader.close()


@pytest.fixture
def store(backend: tuple[FeatureStore, FeatureStore]) -> FeatureStore:
    return backend[0]


@pytest.fixture
def reader(backend: tuple[FeatureStore, FeatureStore]) -> FeatureStore:
    return backend[1]


@pytest.fixture(params=["memory", "mooncake"])
def small_store(request: pytest.FixtureRequest) -> Iterator[FeatureStore]:
    """A store with room for 16 MiB (Mooncake's smallest segment), to reach ``StoreFull``."""
    if request.param == "memory":
        s = open_store(f"memory://{uuid.uuid4().hex[:8]}?capacity_mb=16")
    else:
        master = request.getfixturevalue("fresh_master")
        s = open_store(mooncake_url(master, segment_mb=16, buffer_mb=16))
    yield s
    s.close()
