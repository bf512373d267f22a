"""Tiny target models shared by the producer tests: built once per session, loaded per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.tiny_model import build_tiny_target


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_target(tmp_path_factory.mktemp("models") / "llama", arch="llama")


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_target(tmp_path_factory.mktemp("models") / "qwen3", arch="qwen3",
                             num_layers=8, hidden_size=128)


@pytest.fixture(scope="session")
def llama_tokenizer(llama_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)


@pytest.fixture
def coordinator(tmp_path: Path):  # -> Iterator[CoordinatorProcess]
    """A real coordinator on SQLite, on a free port."""
    from coordinator.server import CoordinatorConfig, CoordinatorProcess
    from services.rpc.server import ServerConfig

    proc = CoordinatorProcess(CoordinatorConfig(
        db_url=f"sqlite:///{tmp_path / 'c.db'}", server=ServerConfig(listen="127.0.0.1:0"),
        reap_seconds=0.1))
    yield proc
    proc.stop(grace=0.5)


@pytest.fixture
def stub(coordinator):  # -> Iterator[CoordinatorServiceStub]
    from services.api import coordinator_pb2_grpc
    from services.rpc.client import open_channel

    channel = open_channel(f"127.0.0.1:{coordinator.port}")
    yield coordinator_pb2_grpc.CoordinatorServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def engine(llama_dir: Path):  # -> HFEngine on CPU, shared by a module's tests
    from producer.engines import EngineConfig, create_engine

    e = create_engine("hf", EngineConfig(model_path=str(llama_dir), device="cpu"))
    yield e
    e.close()


@pytest.fixture
def store():  # -> MemoryStore private to the test
    import uuid

    from services.store.memory import MemoryStore

    return MemoryStore(f"producer-test-{uuid.uuid4().hex[:8]}", store_id="mem")
