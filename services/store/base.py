"""The ``FeatureStore`` contract. Backends: ``memory`` (in process) and ``mooncake``.

Public methods hold the guards (spec validation, checksums, key layout); backends fill the
``_``-prefixed hooks that move bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch

from services.api import common_pb2


class StoreError(Exception):
    """Root of feature-store errors."""


class FeatureLost(StoreError):
    """A tensor is gone (missing key, dead segment owner, short read): recapture the sample."""


class FeatureCorrupt(StoreError):
    """The bytes read do not match the spec's checksum: recapture the sample."""


class StoreFull(StoreError):
    """The store has no room now; retry after some samples are freed (backpressure)."""


class StoreUnavailable(StoreError):
    """The store's control plane cannot be reached after bounded retries."""


class FeatureStore(ABC):
    """Writes a sample's named tensors once; reads them back into buffers allocated from specs."""

    store_id: str

    @abstractmethod
    def put_sample(
        self,
        run_id: str,
        sample_id: str,
        generation: int,
        tensors: Mapping[str, torch.Tensor],
    ) -> list[common_pb2.TensorSpec]:
        """Write every tensor under ``{store_id}/{run_id}/{sample_id}/g{generation}/{name}``.

        A re-put of the same generation overwrites. Returns one spec per tensor, in the
        mapping's order, with the checksum filled.
        """

    @abstractmethod
    def get_sample(
        self,
        specs: Sequence[common_pb2.TensorSpec],
        out: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read each spec's tensor; into ``out[name]`` when given (must match dtype and shape).

        Raises ``FeatureLost`` or ``FeatureCorrupt``; never returns partial data.
        """

    @abstractmethod
    def remove(self, keys: Sequence[str]) -> None:
        """Remove keys; missing keys are not an error (removal is idempotent)."""

    @abstractmethod
    def healthy(self) -> bool:
        """True when the store can serve reads and writes now."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (registered buffers, connections)."""
