"""Write one scheduler batch of samples to the feature store: all of it, or none of it.

A store that can move a whole batch in one transfer (``BatchPutStore``) gets the batch in one
call; any other ``FeatureStore`` gets one ``put_sample`` per sample (for Mooncake: one batched
transfer per sample, straight from registered memory). Either way a failure removes every key
the batch could have written before the error is reported, so no half-written sample stays.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from services.api import common_pb2
from services.errors import InvalidArgument
from services.logs import event
from services.store.base import FeatureStore
from services.tensors import make_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleWrite:
    """One sample's tensors and where they go."""

    run_id: str
    sample_id: str
    generation: int
    tensors: Mapping[str, torch.Tensor]


@runtime_checkable
class BatchPutStore(Protocol):
    """A store that writes several samples in one transfer and rolls all of them back on error."""

    def put_samples(self, samples: Sequence[SampleWrite]) -> list[list[common_pb2.TensorSpec]]:
        """One spec list per sample, in order; raise ``StoreError`` with nothing left written."""
        ...


@runtime_checkable
class RegisteredMemory(Protocol):
    """A store that hands out host memory its transfer engine already registered; a put of a
    tensor inside that memory is sent in place (Mooncake's arena)."""

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor: ...


class BatchWriteFailed(Exception):
    """The batch is not in the store; ``retryable`` says whether the same prompts may succeed."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


def batch_keys(store_id: str, samples: Sequence[SampleWrite]) -> list[str]:
    """Every key the batch writes (``services.tensors.make_key``)."""
    return [
        make_key(store_id, s.run_id, s.sample_id, s.generation, name)
        for s in samples
        for name in s.tensors
    ]


class BatchWriter:
    """Puts scheduler batches into one ``FeatureStore``."""

    def __init__(self, store: FeatureStore) -> None:
        self._store = store

    @property
    def store(self) -> FeatureStore:
        return self._store

    def write(self, samples: Sequence[SampleWrite]) -> list[list[common_pb2.TensorSpec]]:
        """Write every sample or raise ``BatchWriteFailed`` with none of their keys left."""
        if not samples:
            return []
        try:
            if isinstance(self._store, BatchPutStore):
                return self._store.put_samples(samples)
            return [
                self._store.put_sample(s.run_id, s.sample_id, s.generation, s.tensors)
                for s in samples
            ]
        except Exception as exc:
            keys = batch_keys(self._store.store_id, samples)
            self._remove_quietly(keys)
            # A malformed tensor fails the same way every time; anything else (full pool,
            # unreachable master, lost segment) may pass on another try.
            retryable = not isinstance(exc, InvalidArgument | ValueError | TypeError)
            raise BatchWriteFailed(
                f"writing {len(samples)} samples to store {self._store.store_id!r} failed "
                f"({type(exc).__name__}: {exc}); their keys were removed",
                retryable=retryable,
            ) from exc

    def _remove_quietly(self, keys: list[str]) -> None:
        try:
            self._store.remove(keys)
        except Exception:
            # The write already failed; a failed cleanup must not hide that. The keys are
            # unreferenced (never committed), so the coordinator's retirement never frees them:
            # say so loudly.
            log.exception(
                "removing %d keys of a failed capture batch failed; they stay in the store",
                len(keys),
                extra=event("capture_cleanup_failed", keys=len(keys)),
            )
