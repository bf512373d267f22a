"""Feature store on a Mooncake distributed store: tensors move by zero-copy transfers.

Writes go from registered memory (``batch_upsert_from``); reads land straight in the destination
tensors (``batch_get_into``). ``upsert`` rather than ``put`` because ``put`` of an existing key
keeps the old bytes, and a re-put of a generation must overwrite. Objects are hard-pinned: the
coordinator, not Mooncake's eviction, decides when they go.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from services.api import common_pb2
from services.errors import InvalidArgument
from services.logs import event
from services.store import mooncake_codes as codes
from services.store.arena import Arena
from services.store.base import FeatureStore, StoreError, StoreUnavailable
from services.store.samples import (
    allocate,
    build_specs,
    byte_view,
    bytes_checksum,
    check_length,
    check_read_request,
    verify,
)

log = logging.getLogger(__name__)
MiB = 1 << 20
READ_ATTEMPTS = 3
"""Reads of one batch while they keep outlasting the master's lease (-707)."""


@dataclass
class MooncakeConfig:
    """How one process joins a Mooncake cluster (see docs/feature-store.md for the URL form)."""

    master: str
    """Master RPC address, ``HOST:PORT``."""
    store_id: str = "draftflow"
    """First component of every key; one per deployment."""
    local_host: str = "127.0.0.1"
    """Address peers use to reach this process's segment (an IP of this node)."""
    metadata: str = "P2PHANDSHAKE"
    """``P2PHANDSHAKE`` (peers exchange segment descriptors directly) or ``http://H:P/metadata``."""
    protocol: str = "tcp"
    """``tcp`` everywhere, ``rdma`` on clusters with RDMA NICs."""
    device: str = ""
    """RDMA device names (e.g. ``mlx5_0``); empty for tcp."""
    segment_mb: int = 0
    """Memory this process contributes to the pool (0, or at least 16); 0 for pure readers."""
    buffer_mb: int = 256
    """Registered buffer for staging and reads; must hold the largest tensor."""
    placement: str = "local"
    """``local``: put into this process's segment when it has one; ``any``: let the master pick."""
    verify: bool = True
    """Check every tensor's checksum on read."""
    retries: int = 3
    """Attempts for an operation that failed because the master did not answer."""
    retry_delay_s: float = 0.2
    """First back-off between those attempts (doubles each time)."""
    connect_timeout_s: float = 3.0
    """How long to wait for the master's port at start and in ``healthy()``."""

    def __post_init__(self) -> None:
        if self.protocol not in ("tcp", "rdma"):
            raise InvalidArgument(f"protocol: {self.protocol!r}; use tcp or rdma")
        if self.placement not in ("local", "any"):
            raise InvalidArgument(f"placement: {self.placement!r}; use local or any")
        if self.segment_mb < 0 or 0 < self.segment_mb < 16 or self.buffer_mb <= 0:
            raise InvalidArgument(
                f"segment_mb={self.segment_mb}, buffer_mb={self.buffer_mb}: Mooncake needs "
                "segment_mb 0 (no segment) or >= 16, and buffer_mb > 0"
            )
        if ":" not in self.master:
            raise InvalidArgument(f"master: {self.master!r}; use HOST:PORT")


def master_reachable(address: str, timeout_s: float) -> bool:
    """True when a TCP connection to the master's RPC ``HOST:PORT`` succeeds."""
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


class MooncakeStore(FeatureStore):
    """A ``FeatureStore`` whose bytes live in Mooncake segments (this process's, or peers')."""

    def __init__(self, config: MooncakeConfig) -> None:
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig

        self.config = config
        self.store_id = config.store_id
        # setup() retries for about 90 s when the master is down: fail fast instead.
        if not master_reachable(config.master, config.connect_timeout_s):
            raise StoreUnavailable(
                f"Mooncake master {config.master} refuses connections; start mooncake_master "
                "or fix the master address"
            )
        self._client = MooncakeDistributedStore()
        rc = self._client.setup(
            config.local_host, config.metadata, config.segment_mb * MiB, 16 * MiB,
            config.protocol, config.device, config.master,
        )
        if rc != 0:
            raise StoreUnavailable(
                f"joining Mooncake at {config.master} as {config.local_host} failed ({rc}); "
                "check the master address, local_host and the metadata setting"
            )
        self._arena = Arena(config.buffer_mb * MiB)
        rc = self._client.register_buffer(self._arena.base, self._arena.nbytes)
        if rc != 0:
            self._client.close()
            raise StoreError(f"registering the {config.buffer_mb} MiB buffer failed ({rc})")
        self._replicate = ReplicateConfig()
        self._replicate.with_hard_pin = True
        if config.segment_mb and config.placement == "local":
            self._replicate.preferred_segment = self._client.get_hostname()
        # Mooncake refuses zero-length objects: an empty tensor is stored as one marker byte.
        marker = self._arena.tensor(1)
        assert marker is not None
        marker.zero_()
        self._marker = marker
        self._closed = False
        log.info("mooncake store joined", extra=event(
            "store_open", master=config.master, segment=self._client.get_hostname()))
        log.warning(
            "Mooncake's transfer engine listens on every interface (0.0.0.0 and ::), not only "
            "%s: it has no option to bind one address, and no authentication. Firewall its "
            "ports from everything but the cluster's private network (docs/feature-store.md)",
            config.local_host, extra=event("store_listens_everywhere", local=config.local_host))

    @property
    def segment_name(self) -> str:
        """This process's segment name (``HOST:PORT``) as the master knows it."""
        return self._client.get_hostname()

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A tensor in registered memory: write it with ``put_sample`` without a staging copy."""
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        flat = self._arena.tensor(nbytes, timeout_s=30.0)
        if flat is None:
            raise StoreError(
                "the registered buffer stayed full for 30 s; free tensors from empty() "
                "or raise buffer_mb"
            )
        return flat.view(dtype).view(tuple(shape)) if nbytes else torch.empty(shape, dtype=dtype)

    # -- writes -------------------------------------------------------------------------------

    def put_sample(
        self, run_id: str, sample_id: str, generation: int, tensors: Mapping[str, torch.Tensor]
    ) -> list[common_pb2.TensorSpec]:
        self._check_open()
        specs = build_specs(self.store_id, run_id, sample_id, generation, tensors)
        batch: list[tuple[str, torch.Tensor]] = []
        written: list[str] = []
        try:
            for spec, tensor in zip(specs, tensors.values(), strict=True):
                data = self._sendable(tensor, spec.nbytes, lambda: self._flush(batch, written))
                spec.checksum = bytes_checksum(data)
                batch.append((spec.key, data if spec.nbytes else self._marker))
            self._flush(batch, written)
        except BaseException:
            self._remove_quietly(written)
            raise
        return specs

    def _sendable(
        self, tensor: torch.Tensor, nbytes: int, flush: Callable[[], None]
    ) -> torch.Tensor:
        """The tensor's bytes in registered memory: in place if already there, else staged."""
        t = tensor.detach()
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        if t.is_contiguous() and self._arena.contains(t):
            return byte_view(t)
        staged = self._arena.tensor(nbytes)
        if staged is None:  # the arena is busy with this sample's earlier tensors: send them
            flush()
            staged = self._arena.tensor(nbytes, timeout_s=30.0)
            if staged is None:
                raise StoreError("the registered buffer stayed full for 30 s; raise buffer_mb")
        # One copy handles non-contiguous and CUDA sources alike.
        staged.view(t.dtype).view(t.shape).copy_(t)
        return staged

    def _flush(self, batch: list[tuple[str, torch.Tensor]], written: list[str]) -> None:
        if not batch:
            return
        keys = [k for k, _ in batch]
        ptrs = [d.data_ptr() for _, d in batch]
        sizes = [max(1, d.numel()) for _, d in batch]
        results = self._call(
            "upsert", keys[0],
            lambda: self._client.batch_upsert_from(keys, ptrs, sizes, self._replicate),
        )
        for key, rc in zip(keys, results, strict=True):
            if rc == 0:
                written.append(key)
        for key, rc in zip(keys, results, strict=True):
            if rc != 0:
                raise codes.error_for(rc, key, "upsert")
        batch.clear()

    # -- reads --------------------------------------------------------------------------------

    def get_sample(
        self,
        specs: Sequence[common_pb2.TensorSpec],
        out: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        self._check_open()
        check_read_request(self.store_id, specs, out)
        result: dict[str, torch.Tensor] = {}
        landing: list[tuple[common_pb2.TensorSpec, torch.Tensor, torch.Tensor | None]] = []
        for spec in specs:
            dest = allocate(spec, out)
            result[spec.name] = dest
            landing.append((spec, dest, self._landing(spec, dest)))
        # Staged reads hold arena space until their batch ends: batch in arena-sized groups.
        group: list[tuple[common_pb2.TensorSpec, torch.Tensor, torch.Tensor | None]] = []
        group_bytes = 0
        for item in landing:
            size = max(1, item[0].nbytes) if item[2] is None else 0
            if group and group_bytes + size > self._arena.nbytes // 2:
                self._fetch(group)
                group, group_bytes = [], 0
            group.append(item)
            group_bytes += size
        self._fetch(group)
        return result

    def _landing(self, spec: common_pb2.TensorSpec, dest: torch.Tensor) -> torch.Tensor | None:
        """The destination's bytes when the transport can write there directly, else None."""
        if spec.nbytes == 0 or dest.device.type != "cpu":
            return None
        # TCP writes into any memory; RDMA only into registered memory.
        if self.config.protocol == "tcp" or self._arena.contains(dest):
            return byte_view(dest)
        return None

    def _fetch(
        self, group: list[tuple[common_pb2.TensorSpec, torch.Tensor, torch.Tensor | None]]
    ) -> None:
        if not group:
            return
        buffers: list[torch.Tensor] = []
        for spec, _, land in group:
            if land is None:
                land = self._arena.tensor(max(1, spec.nbytes), timeout_s=30.0)
                if land is None:
                    raise StoreError("the registered buffer stayed full for 30 s; raise buffer_mb")
            buffers.append(land)
        keys = [spec.key for spec, _, _ in group]
        ptrs = [b.data_ptr() for b in buffers]
        sizes = [b.numel() for b in buffers]
        # A read that outlasts the master's lease on its object (a slow link, a busy node)
        # may have raced a change to it: read again; after the last try the sample is lost.
        for _ in range(READ_ATTEMPTS):
            results = self._call(
                "get", keys[0], lambda: self._client.batch_get_into(keys, ptrs, sizes)
            )
            if codes.LEASE_EXPIRED not in results:
                break
            log.warning("read outlasted its lease, reading again", extra=event(
                "store_read_lease_expired", key=keys[0], keys=len(keys)))
        for (spec, dest, land), buf, rc in zip(group, buffers, results, strict=True):
            stored = rc
            if rc == codes.INVALID_PARAMS:  # e.g. the object is larger than the destination
                stored = self._client.get_size(spec.key)
                if 0 <= stored <= buf.numel():
                    raise codes.error_for(rc, spec.key, "get")
            if stored < 0:
                raise codes.error_for(stored, spec.key, "get")
            # An empty tensor is stored as one marker byte.
            check_length(spec, stored if spec.nbytes else stored - 1)
            if spec.nbytes == 0:
                continue
            if self.config.verify:
                verify(spec, buf)
            if land is None:
                byte_view(dest).copy_(buf)

    # -- lifetime -----------------------------------------------------------------------------

    def remove(self, keys: Sequence[str]) -> None:
        self._check_open()
        keys = list(keys)
        if not keys:
            return
        codes_by_key = dict(
            zip(keys, self._call("remove", keys[0], lambda: self._client.batch_remove(keys, False)),
                strict=True)
        )
        # The coordinator decides lifetimes: a reader's lease does not keep an object alive.
        leased = [k for k, rc in codes_by_key.items() if rc == codes.OBJECT_HAS_LEASE]
        if leased:
            forced = self._call(
                "remove", leased[0], lambda: self._client.batch_remove(leased, True)
            )
            codes_by_key.update(zip(leased, forced, strict=True))
        for key, rc in codes_by_key.items():
            if rc not in (0, codes.OBJECT_NOT_FOUND):
                raise codes.error_for(rc, key, "remove")

    def _remove_quietly(self, keys: list[str]) -> None:
        """Best effort on a failed write's way out: the original error is what the caller needs."""
        if keys:
            results = self._client.batch_remove(keys, True)
            left = [k for k, rc in zip(keys, results, strict=True)
                    if rc not in (0, codes.OBJECT_NOT_FOUND)]
            if left:
                log.warning("keys of a failed write left behind", extra=event(
                    "store_cleanup_failed", keys=",".join(left)))

    def healthy(self) -> bool:
        if self._closed:
            return False
        # The client's own health check stays 0 while the master is down: probe the port too.
        return (
            master_reachable(self.config.master, self.config.connect_timeout_s)
            and self._client.health_check() == 0
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for step, rc in (("unregister_buffer", self._client.unregister_buffer(self._arena.base)),
                         ("close", self._client.close())):
            if rc != 0:  # nothing to undo at close; leave a trace for the operator
                log.warning("mooncake client shutdown step failed", extra=event(
                    "store_close_failed", step=step, code=rc))

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed; open a new one with open_store(url)")

    def _call(self, op: str, key: str, fn: Callable[[], list[int]]) -> list[int]:
        """Run a batch call, retrying a bounded number of times while the master does not answer."""
        delay = self.config.retry_delay_s
        for attempt in range(self.config.retries):
            results = list(fn())
            if codes.RPC_FAIL not in results:
                return results
            log.warning("mooncake master unreachable", extra=event(
                "store_retry", op=op, key=key, attempt=attempt + 1))
            if attempt + 1 < self.config.retries:
                time.sleep(delay)
                delay *= 2
        raise codes.error_for(codes.RPC_FAIL, key, op)
