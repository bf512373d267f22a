"""The registered-memory arena: pieces come back when their tensors die, never before."""

from __future__ import annotations

import pytest
import torch

from services.errors import InvalidArgument
from services.store import FeatureStore
from services.store.arena import Arena


def test_bytes_return_when_the_last_view_dies():
    arena = Arena(1 << 20)
    t = arena.tensor(1000)
    assert t is not None and arena.contains(t)
    view = t[10:].view(torch.int8)
    del t
    assert arena.free_bytes() == (1 << 20) - 1024  # the view still holds the piece
    del view
    assert arena.free_bytes() == 1 << 20


def test_full_arena_answers_none_then_serves_after_a_free():
    arena = Arena(4096)
    pieces = [arena.tensor(1024) for _ in range(4)]
    assert arena.tensor(64) is None
    pieces.pop()
    assert arena.tensor(1024) is not None


def test_freed_neighbours_merge_into_one_piece():
    arena = Arena(4096)
    a, b = arena.tensor(2048), arena.tensor(2048)
    del a, b
    assert arena.tensor(4096) is not None


def test_a_tensor_larger_than_the_arena_is_refused():
    with pytest.raises(InvalidArgument, match="raise buffer_mb"):
        Arena(4096).tensor(8192)


def test_memory_outside_the_arena_is_not_contained():
    arena = Arena(4096)
    assert not arena.contains(torch.zeros(16))
    assert not arena.contains(torch.zeros(0))


def test_tensors_from_registered_memory_round_trip(mooncake_pair: tuple[FeatureStore, ...]):
    writer, reader = mooncake_pair
    hidden = writer.empty((16, 32), torch.bfloat16)  # type: ignore[attr-defined]
    hidden.copy_(torch.randn(16, 32))
    specs = writer.put_sample("run", "registered", 0, {"h": hidden})
    assert torch.equal(reader.get_sample(specs)["h"], hidden)
