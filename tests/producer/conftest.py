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
