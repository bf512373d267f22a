"""Fixtures for the SGLang capture tests: a feature store and the plugin hooked onto the fakes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import pytest
import torch

import producer.sglang_plugin as plugin
from producer.sglang_plugin.hooks import CaptureHooks
from services.api import common_pb2
from services.store.base import FeatureLost, FeatureStore
from services.tensors import dtype_of, make_key, tensor_checksum
from tests.sglang import fakes

HIDDEN = 16
AUX_LAYERS = [1, 3, 4]


class DictStore(FeatureStore):
    """The ``FeatureStore`` contract over a dict, used where ``services.store`` has no
    ``open_store`` yet; it records every put and remove so tests can count them."""

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
    """The in-memory feature store (the real backend when it exists)."""
    from services import store as store_pkg

    open_store = getattr(store_pkg, "open_store", None)
    if open_store is not None:
        return open_store("memory://st")
    return DictStore("st")


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
