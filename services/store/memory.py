"""In-process feature store: for unit tests and single-process runs (producer and trainer together).

Stores with the same name in one process share their contents, so ``open_store("memory://x")``
called by a producer and a trainer in one process reaches the same data.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch

from services.api import common_pb2
from services.store.base import FeatureLost, FeatureStore, StoreFull
from services.store.samples import (
    allocate,
    build_specs,
    byte_view,
    bytes_checksum,
    check_length,
    check_read_request,
    verify,
)


class _Space:
    """The bytes of one named memory store, shared by every handle on that name."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, torch.Tensor] = {}
        self.used = 0


_SPACES: dict[str, _Space] = {}
_SPACES_LOCK = threading.Lock()


def _space(name: str) -> _Space:
    with _SPACES_LOCK:
        return _SPACES.setdefault(name, _Space())


class MemoryStore(FeatureStore):
    """A ``FeatureStore`` in this process's memory; copies on put, so callers may reuse buffers.

    ``capacity_bytes`` (0 = unlimited) bounds the bytes held: a put that would exceed it raises
    ``StoreFull``, as the Mooncake pool does when full.
    """

    def __init__(
        self, name: str, store_id: str | None = None, capacity_bytes: int = 0, verify: bool = True
    ) -> None:
        self.name = name
        self.store_id = store_id or name
        self.capacity_bytes = capacity_bytes
        self.verify = verify
        self._space = _space(name)
        self._closed = False

    def put_sample(
        self, run_id: str, sample_id: str, generation: int, tensors: Mapping[str, torch.Tensor]
    ) -> list[common_pb2.TensorSpec]:
        specs = build_specs(self.store_id, run_id, sample_id, generation, tensors)
        copies = []
        for spec, tensor in zip(specs, tensors.values(), strict=True):
            data = byte_view(tensor.detach().cpu().contiguous()).clone()
            spec.checksum = bytes_checksum(data)
            copies.append(data)
        space = self._space
        with space.lock:
            freed = sum(space.objects[s.key].numel() for s in specs if s.key in space.objects)
            added = sum(s.nbytes for s in specs)
            if self.capacity_bytes and space.used - freed + added > self.capacity_bytes:
                raise StoreFull(
                    f"memory store {self.name!r}: {added} bytes do not fit "
                    f"({space.used} of {self.capacity_bytes} used); retry after removals"
                )
            for spec, data in zip(specs, copies, strict=True):
                old = space.objects.get(spec.key)
                space.used += data.numel() - (old.numel() if old is not None else 0)
                space.objects[spec.key] = data
        return specs

    def get_sample(
        self,
        specs: Sequence[common_pb2.TensorSpec],
        out: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        check_read_request(self.store_id, specs, out)
        with self._space.lock:
            found = [self._space.objects.get(spec.key) for spec in specs]
        for spec, data in zip(specs, found, strict=True):
            if data is None:
                raise FeatureLost(f"{spec.key}: no such key; recapture the sample")
            check_length(spec, data.numel())
            if self.verify:
                verify(spec, data)
        result = {}
        for spec, data in zip(specs, found, strict=True):
            dest = allocate(spec, out)
            byte_view(dest).copy_(data)
            result[spec.name] = dest
        return result

    def remove(self, keys: Sequence[str]) -> None:
        space = self._space
        with space.lock:
            for key in keys:
                data = space.objects.pop(key, None)
                if data is not None:
                    space.used -= data.numel()

    def healthy(self) -> bool:
        return not self._closed

    def close(self) -> None:
        self._closed = True

    def _overwrite(self, key: str, data: bytes) -> None:
        """Replace a stored object's bytes behind the checksums' back (tests of corruption)."""
        with self._space.lock:
            self._space.objects[key] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
