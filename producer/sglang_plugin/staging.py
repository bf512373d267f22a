"""One long-lived host buffer that every scheduler batch's features are copied into.

Registering memory with the store's transfer engine is slow, so the buffer comes from memory the
store has already registered (``RegisteredMemory.empty``, Mooncake's arena) where the store offers
it, and is reused by every batch: the store then sends straight from it, without a staging copy of
its own. Other stores get a page-locked buffer (when CUDA is present, so device-to-host copies run
asynchronously). The buffer grows only when a batch needs more bytes than it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from services.logs import event

log = logging.getLogger(__name__)
_ALIGN = 64


def align(nbytes: int) -> int:
    """Round up so every tensor view starts on a cache-line boundary."""
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def pinned_bytes(nbytes: int) -> torch.Tensor:
    """A flat uint8 host buffer, page-locked when CUDA is present."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())


class HostStaging:
    """A reusable byte buffer handed out as typed views, reset after every batch."""

    def __init__(
        self, capacity: int, allocate: Callable[[int], torch.Tensor] = pinned_bytes
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"staging capacity must be > 0 bytes, got {capacity}")
        self._allocate = allocate
        self._buffer = allocate(capacity)
        self._used = 0

    @property
    def capacity(self) -> int:
        return self._buffer.numel()

    @property
    def buffer(self) -> torch.Tensor:
        """The whole buffer (uint8)."""
        return self._buffer

    def ensure(self, nbytes: int) -> None:
        """Make room for ``nbytes`` in one batch; only call while nothing is handed out."""
        if self._used:
            raise RuntimeError("cannot resize the staging buffer while a batch holds views")
        if nbytes <= self.capacity:
            return
        old_capacity = self.capacity
        # Registered memory is finite: give the old buffer back before taking a larger one,
        # and settle for the exact size when doubling does not fit.
        del self._buffer
        error: Exception | None = None
        for candidate in dict.fromkeys((max(nbytes, 2 * old_capacity), nbytes)):
            try:
                self._buffer = self._allocate(candidate)
            except Exception as exc:
                error = exc
                continue
            log.info(
                "grew the capture staging buffer from %d to %d bytes",
                old_capacity,
                candidate,
                extra=event("staging_grow", capacity=candidate),
            )
            return
        self._buffer = self._allocate(old_capacity)
        assert error is not None
        raise error

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A view of the next free bytes with ``shape`` and ``dtype``."""
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        end = self._used + nbytes
        if end > self.capacity:
            raise RuntimeError(
                f"staging buffer overflow: {end} > {self.capacity} bytes; call ensure() first"
            )
        view = self._buffer[self._used : end].view(dtype).view(shape)
        self._used = align(end)
        return view

    def reset(self) -> None:
        """Forget every view handed out; their bytes will be overwritten by the next batch."""
        self._used = 0
