"""``open_store(url)``: every scheme and parameter, and the errors for bad URLs."""

from __future__ import annotations

import pytest
import torch

from services.errors import InvalidArgument
from services.store import StoreUnavailable, open_store
from services.store.memory import MemoryStore
from services.store.mooncake import MooncakeStore
from services.store.mooncake_proc import MasterHandle, free_port


def test_memory_url_sets_name_store_id_capacity_and_verify():
    store = open_store("memory://feat?store_id=s9&capacity_mb=2&verify=0")
    assert isinstance(store, MemoryStore)
    assert (store.name, store.store_id, store.capacity_bytes, store.verify) == (
        "feat", "s9", 2 << 20, False)


def test_memory_stores_of_one_name_share_data():
    specs = open_store("memory://shared-x").put_sample("r", "s", 0, {"x": torch.ones(3)})
    assert torch.equal(open_store("memory://shared-x").get_sample(specs)["x"], torch.ones(3))


def test_mooncake_url_reaches_the_master(mooncake_master: MasterHandle):
    store = open_store(mooncake_master.url("fac", buffer_mb=4, verify=0, placement="any"))
    try:
        assert isinstance(store, MooncakeStore)
        assert store.store_id == "fac"
        assert store.config.verify is False
        assert store.config.master == mooncake_master.address
        assert store.healthy()
    finally:
        store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://x", "scheme must be memory:// or mooncake://"),
        ("memory://", "name the store"),
        ("memory://x?size=3", r"unknown parameter\(s\) \['size'\]"),
        ("memory://x?capacity_mb=lots", "capacity_mb='lots' is not an integer"),
        ("memory://x?verify=maybe", "verify='maybe'; use 1 or 0"),
        ("mooncake://", "give the master"),
        ("mooncake://h:1?protocol=udp", "protocol: 'udp'; use tcp or rdma"),
        ("mooncake://h:1?segment_mb=8", "segment_mb 0 .* or >= 16"),
        ("mooncake://h:1?placement=far", "placement: 'far'"),
    ],
)
def test_bad_urls_say_what_to_fix(url: str, message: str):
    with pytest.raises(InvalidArgument, match=message):
        open_store(url)


def test_no_master_fails_fast_with_store_unavailable():
    with pytest.raises(StoreUnavailable, match="refuses connections; start mooncake_master"):
        open_store(f"mooncake://127.0.0.1:{free_port()}")
