"""A region of registered memory carved into tensors that return their bytes when freed.

Registering memory with the transfer engine is slow (page pinning, RDMA key exchange), so the
store registers one arena at start and hands out pieces of it; no operation registers or
unregisters memory.
"""

from __future__ import annotations

import ctypes
import threading
import time
import weakref

import torch

from services.errors import InvalidArgument

_ALIGN = 64


class Arena:
    """First-fit allocator over one contiguous buffer; thread-safe."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._memory = torch.empty(nbytes, dtype=torch.uint8)
        self.base = self._memory.data_ptr()
        self._free: list[tuple[int, int]] = [(0, nbytes)]  # (offset, size), sorted by offset
        self._cond = threading.Condition()

    def contains(self, tensor: torch.Tensor) -> bool:
        """True when the tensor's bytes lie inside the arena (so it can be sent as is)."""
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            return False
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        return self.base <= start and end <= self.base + self.nbytes

    def tensor(self, nbytes: int, timeout_s: float | None = 0.0) -> torch.Tensor | None:
        """A flat uint8 tensor of ``nbytes`` inside the arena, or None if none frees in time.

        The bytes go back to the arena when the tensor and every view of it are gone.
        """
        size = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
        if size > self.nbytes:
            raise InvalidArgument(
                f"a {nbytes}-byte tensor does not fit the {self.nbytes}-byte registered buffer; "
                "raise buffer_mb in the store URL"
            )
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while (offset := self._take(size)) is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
        owner = (ctypes.c_uint8 * nbytes).from_address(self.base + offset)
        weakref.finalize(owner, self._give, offset, size)
        # frombuffer keeps `owner` alive for as long as the tensor's storage lives.
        return torch.frombuffer(owner, dtype=torch.uint8) if nbytes else _empty_holding(owner)

    def _take(self, size: int) -> int | None:
        for i, (offset, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[i]
                else:
                    self._free[i] = (offset + size, free - size)
                return offset
        return None

    def _give(self, offset: int, size: int) -> None:
        with self._cond:
            self._free.append((offset, size))
            self._free.sort()
            merged: list[tuple[int, int]] = []
            for off, sz in self._free:
                if merged and merged[-1][0] + merged[-1][1] == off:
                    merged[-1] = (merged[-1][0], merged[-1][1] + sz)
                else:
                    merged.append((off, sz))
            self._free = merged
            self._cond.notify_all()

    def free_bytes(self) -> int:
        with self._cond:
            return sum(size for _, size in self._free)


def _empty_holding(owner: object) -> torch.Tensor:
    # A zero-length buffer cannot back a tensor; the region is released at once.
    del owner
    return torch.empty(0, dtype=torch.uint8)
