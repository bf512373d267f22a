"""The FeatureStore contract, run on every backend (memory; Mooncake with a real master)."""

from __future__ import annotations

import threading

import pytest
import torch

from services.api import common_pb2
from services.errors import InvalidArgument
from services.store import FeatureCorrupt, FeatureLost, FeatureStore, StoreFull
from services.tensors import tensor_checksum

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.int32, torch.bool,
          torch.uint8]


def _sample_of(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        base = torch.randint(0, 2, (6, 10), generator=g).bool()
    elif dtype.is_floating_point:
        base = torch.randn(6, 10, generator=g).to(dtype)
    else:
        base = torch.randint(-100 if dtype != torch.uint8 else 0, 100, (6, 10), generator=g)
        base = base.to(dtype)
    return {
        "dense": base,
        "strided": base.t()[::2],  # non-contiguous
        "empty": base[:0],
        "scalar": base[1, 1],
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (bitwise, so NaN payloads and -0.0 count)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact(store: FeatureStore, reader: FeatureStore, dtype: torch.dtype):
    sample = _sample_of(dtype)
    specs = store.put_sample("run", "p1:e0", 0, sample)
    assert [s.name for s in specs] == list(sample)
    for spec, (name, t) in zip(specs, sample.items(), strict=True):
        assert spec.key == f"{store.store_id}/run/p1:e0/g0/{name}"
        assert list(spec.shape) == list(t.shape)
        assert spec.nbytes == t.numel() * t.element_size()
        assert spec.checksum == tensor_checksum(t)
    got = reader.get_sample(specs)
    for name, t in sample.items():
        assert _same(t, got[name]), name
        assert got[name].is_contiguous()


def test_reads_into_caller_buffers(store: FeatureStore, reader: FeatureStore):
    sample = _sample_of(torch.float32)
    specs = store.put_sample("run", "s", 0, sample)
    out = {name: torch.full(t.shape, -1.0) for name, t in sample.items()}
    got = reader.get_sample(specs, out=out)
    for name in sample:
        assert got[name] is out[name]
        assert torch.equal(out[name], sample[name])


def test_out_buffer_of_wrong_shape_is_refused(store: FeatureStore):
    specs = store.put_sample("run", "s", 0, {"x": torch.zeros(4)})
    with pytest.raises(InvalidArgument, match=r"out\['x'\]: has torch.float32 \[5\]"):
        store.get_sample(specs, out={"x": torch.zeros(5)})


def test_reput_of_same_generation_overwrites(store: FeatureStore, reader: FeatureStore):
    store.put_sample("run", "s", 1, {"x": torch.zeros(1000)})
    specs = store.put_sample("run", "s", 1, {"x": torch.ones(1000)})
    assert torch.equal(reader.get_sample(specs)["x"], torch.ones(1000))


def test_missing_key_is_lost(store: FeatureStore):
    specs = store.put_sample("run", "s", 0, {"x": torch.zeros(8)})
    ghost = common_pb2.TensorSpec()
    ghost.CopyFrom(specs[0])
    ghost.key = f"{store.store_id}/run/never/g0/x"
    with pytest.raises(FeatureLost, match="never/g0/x"):
        store.get_sample([ghost])


def test_removed_key_is_lost_and_remove_is_idempotent(store: FeatureStore, reader: FeatureStore):
    specs = store.put_sample("run", "s", 0, {"x": torch.zeros(8), "e": torch.zeros(0)})
    reader.get_sample(specs)  # leaves a read lease behind, which remove must override
    keys = [s.key for s in specs]
    store.remove(keys)
    store.remove(keys)
    for spec in specs:
        with pytest.raises(FeatureLost):
            reader.get_sample([spec])


def test_checksum_mismatch_is_corrupt(store: FeatureStore):
    specs = store.put_sample("run", "s", 0, {"x": torch.arange(100)})
    specs[0].checksum ^= 1
    with pytest.raises(FeatureCorrupt, match="checksum"):
        store.get_sample(specs)


def test_short_read_is_lost(store: FeatureStore):
    specs = store.put_sample("run", "s", 0, {"x": torch.arange(100)})
    specs[0].shape[0] = 101
    specs[0].nbytes = 808
    with pytest.raises(FeatureLost, match="short read, 800 of 808"):
        store.get_sample(specs)


def test_longer_object_than_spec_is_corrupt(store: FeatureStore):
    specs = store.put_sample("run", "s", 0, {"x": torch.arange(100)})
    specs[0].shape[0] = 99
    specs[0].nbytes = 792
    with pytest.raises(FeatureCorrupt, match="800 bytes"):
        store.get_sample(specs)


def test_keys_of_another_store_are_refused(store: FeatureStore):
    specs = store.put_sample("run", "s", 0, {"x": torch.zeros(2)})
    specs[0].key = "elsewhere/run/s/g0/x"
    with pytest.raises(InvalidArgument, match="outside the prefix"):
        store.get_sample(specs)


def test_bad_names_and_dtypes_are_refused(store: FeatureStore):
    with pytest.raises(InvalidArgument, match="name"):
        store.put_sample("run", "s", 0, {"bad/name": torch.zeros(2)})
    with pytest.raises(InvalidArgument, match="complex"):
        store.put_sample("run", "s", 0, {"x": torch.zeros(2, dtype=torch.complex64)})


def test_many_concurrent_readers(store: FeatureStore, reader: FeatureStore):
    samples = {i: {"h": torch.randn(64, 128), "ids": torch.arange(64) + i} for i in range(8)}
    specs = {i: store.put_sample("run", f"s{i}", 0, t) for i, t in samples.items()}
    failures: list[str] = []

    def read_all(offset: int) -> None:
        for k in range(8):
            i = (k + offset) % 8
            got = reader.get_sample(specs[i])
            if not (torch.equal(got["h"], samples[i]["h"]) and torch.equal(got["ids"],
                                                                          samples[i]["ids"])):
                failures.append(f"reader {offset} sample {i}")

    threads = [threading.Thread(target=read_all, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []


def test_full_store_raises_store_full_then_accepts_after_removals(small_store: FeatureStore):
    mib = torch.zeros(1 << 20, dtype=torch.uint8)
    kept = []
    with pytest.raises(StoreFull, match="retry after"):
        for i in range(64):
            kept.append(small_store.put_sample("run", f"s{i}", 0, {"x": mib}))
    assert kept, "the store took nothing before it filled"
    small_store.remove([s.key for specs in kept for s in specs])
    specs = small_store.put_sample("run", "after", 0, {"x": mib})
    assert torch.equal(small_store.get_sample(specs)["x"], mib)


@pytest.mark.parametrize("kind", ["memory", "mooncake"])
def test_healthy_until_closed(kind: str, request: pytest.FixtureRequest):
    from services.store import open_store

    if kind == "memory":
        s = open_store("memory://health")
    else:
        s = open_store(request.getfixturevalue("mooncake_master").url("health", buffer_mb=1))
    assert s.healthy()
    s.close()
    assert not s.healthy()
