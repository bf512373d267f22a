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
