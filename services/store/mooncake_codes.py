"""Mooncake store return codes and the typed errors they become."""

from __future__ import annotations

from services.store.base import FeatureLost, StoreError, StoreFull, StoreUnavailable

NO_AVAILABLE_HANDLE = -200  # the pool has no room
INVALID_PARAMS = -600  # e.g. the destination is smaller than the stored object
OBJECT_NOT_FOUND = -704
OBJECT_HAS_LEASE = -706  # a reader holds a lease on the object
LEASE_EXPIRED = -707  # a read outlasted its lease: the object may have changed meanwhile
TRANSFER_FAIL = -800  # the segment owner is unreachable (dead writer, until the master drops it)
RPC_FAIL = -900  # the master cannot be reached


def error_for(code: int, key: str, op: str) -> StoreError:
    """The typed error for a negative return code of ``op`` on ``key``."""
    if code in (OBJECT_NOT_FOUND, TRANSFER_FAIL):
        reason = "no such key" if code == OBJECT_NOT_FOUND else "its segment owner is gone"
        return FeatureLost(f"{key}: {reason} (mooncake {op} -> {code}); recapture the sample")
    if code == LEASE_EXPIRED:
        return FeatureLost(
            f"{key}: every read outlasted the master's lease on the object (mooncake {op} -> "
            f"{code}), so what arrived cannot be trusted; recapture the sample (a master "
            "--default_kv_lease_ttl longer than a read takes avoids this)")
    if code == NO_AVAILABLE_HANDLE:
        return StoreFull(
            f"{key}: the Mooncake pool is full (mooncake {op} -> {code}); retry after samples "
            "are freed, or add memory (segment_mb, or a holder process)"
        )
    if code == RPC_FAIL:
        return StoreUnavailable(
            f"{key}: the Mooncake master does not answer (mooncake {op} -> {code}); "
            "check that mooncake_master runs and is reachable"
        )
    return StoreError(f"{key}: mooncake {op} failed with code {code}")
