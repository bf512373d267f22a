"""Fixtures for the SGLang capture tests: a feature store and the plugin hooked onto the fakes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence

import pytest
import torch

import producer.sglang_plugin as plugin
from producer.sglang_plugin import wire
from producer.sglang_plugin.hooks import CaptureHooks
from services.api import common_pb2
from services.store import open_store
from services.store.base import FeatureLost, FeatureStore
from services.tensors import dtype_of, make_key, tensor_checksum
from tests.sglang import fakes

HIDDEN = 16
AUX_LAYERS = [1, 3, 4]
VOCAB = 64


class DictStore(FeatureStore):
    """The ``FeatureStore`` contract over a dict that records every put and remove, for tests
    that count them or inject failures (the same paths also run on the real stores)."""

    def __init__(self, store_id: str = "st") -> None:
        self.store_id = store_id
        self.data: dict[str, torch.Tensor] = {}
        self.puts: list[str] = []
        self.removed: list[str] = []

    def put_sample(
        self, run_id: str, sample_id: str, generation: int, tensors: Mapping[str, torch.Tensor]
    ) -> list[common_pb2.TensorSpec]:
        specs = []
        for name, tensor in tensors.items():
            key = make_key(self.store_id, run_id, sample_id, generation, name)
            self.data[key] = tensor.detach().clone()
            self.puts.append(key)
            specs.append(
                common_pb2.TensorSpec(
                    name=name,
                    dtype=dtype_of(tensor),
                    shape=list(tensor.shape),
                    nbytes=tensor.numel() * tensor.element_size(),
                    key=key,
                    checksum=tensor_checksum(tensor),
                )
            )
        return specs

    def get_sample(
        self,
        specs: Sequence[common_pb2.TensorSpec],
        out: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        result = {}
        for spec in specs:
            if spec.key not in self.data:
                raise FeatureLost(f"{spec.key} is missing")
            result[spec.name] = self.data[spec.key].clone()
        return result

    def remove(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.removed.append(key)
            self.data.pop(key, None)

    def healthy(self) -> bool:
        return True


@pytest.fixture
def store() -> FeatureStore:
    """A fresh in-memory feature store with store id ``st``."""
    return open_store(f"memory://sglang-{uuid.uuid4().hex}?store_id=st")


def absent(store: FeatureStore, sample_id: str, num_tokens: int, run_id: str = "run1") -> bool:
    """True when none of the plugin's tensors for ``run_id/sample_id/g0`` is in the store."""
    shapes = {
        wire.INPUT_IDS: (common_pb2.DTYPE_INT64, [num_tokens], 8),
        wire.AUX_HIDDEN_STATE: (common_pb2.DTYPE_BFLOAT16, [num_tokens, 3 * HIDDEN], 2),
        wire.HIDDEN_STATE: (common_pb2.DTYPE_BFLOAT16, [num_tokens, HIDDEN], 2),
    }
    for name, (dtype, shape, size) in shapes.items():
        numel = 1
        for d in shape:
            numel *= d
        spec = common_pb2.TensorSpec(
            name=name,
            dtype=dtype,
            shape=shape,
            nbytes=numel * size,
            key=make_key(store.store_id, run_id, sample_id, 0, name),
        )
        try:
            store.get_sample([spec])
        except FeatureLost:
            continue
        except Exception:
            return False
        return False
    return True


@pytest.fixture
def hooked() -> Iterator[None]:
    """The fake SGLang classes with the plugin's hooks installed, removed afterwards."""
    yield
    plugin.uninstall(fakes.SchedulerBatchResultProcessor, fakes.SchedulerOutputStreamer)


def install_on_fakes(store: FeatureStore, staging_bytes: int = 1 << 16) -> CaptureHooks:
    return plugin.install(
        fakes.SchedulerBatchResultProcessor,
        fakes.SchedulerOutputStreamer,
        version="0.5.23",
        hooks=CaptureHooks(lambda: store, staging_bytes),
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A target directory with only config.json: all the producer reads in SGLang mode."""
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("target")
    LlamaConfig(
        num_hidden_layers=8,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    ).save_pretrained(path)
    return str(path)
