"""Guards every backend applies: building specs on write, checking specs and buffers on read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from services.api import common_pb2
from services.errors import InvalidArgument
from services.store.base import FeatureCorrupt, FeatureLost
from services.tensors import (
    DTYPE_TO_TORCH,
    checksum,
    dtype_of,
    make_key,
    validate_spec,
    validate_specs,
)


def build_specs(
    store_id: str, run_id: str, sample_id: str, generation: int,
    tensors: Mapping[str, torch.Tensor],
) -> list[common_pb2.TensorSpec]:
    """One spec per tensor (checksum left 0 for the backend to fill), validated before any I/O."""
    if not run_id or not sample_id:
        raise InvalidArgument("run_id and sample_id must be non-empty")
    if generation < 0:
        raise InvalidArgument(f"generation: {generation} is negative")
    if not tensors:
        raise InvalidArgument("tensors: a sample needs at least one tensor")
    specs = []
    for name, tensor in tensors.items():
        spec = common_pb2.TensorSpec(
            name=name,
            dtype=dtype_of(tensor),
            shape=list(tensor.shape),
            nbytes=tensor.numel() * tensor.element_size(),
            key=make_key(store_id, run_id, sample_id, generation, name),
        )
        validate_spec(spec, f"tensors[{name!r}]")
        specs.append(spec)
    return specs


def check_read_request(
    store_id: str,
    specs: Sequence[common_pb2.TensorSpec],
    out: Mapping[str, torch.Tensor] | None,
) -> None:
    """Refuse malformed specs, keys of another store and ``out`` buffers that do not fit."""
    validate_specs(list(specs), "specs", key_prefix=f"{store_id}/")
    for spec in specs:
        if out is None or spec.name not in out:
            continue
        buf = out[spec.name]
        want = DTYPE_TO_TORCH[spec.dtype]
        if buf.dtype != want or tuple(buf.shape) != tuple(spec.shape):
            raise InvalidArgument(
                f"out[{spec.name!r}]: has {buf.dtype} {list(buf.shape)}, the spec needs "
                f"{want} {list(spec.shape)}; allocate it with services.tensors.empty_like_spec"
            )
        if not buf.is_contiguous():
            raise InvalidArgument(f"out[{spec.name!r}]: must be contiguous")


def allocate(spec: common_pb2.TensorSpec, out: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    """The caller's buffer for ``spec`` when given, else a fresh CPU tensor from the spec."""
    if out is not None and spec.name in out:
        return out[spec.name]
    return torch.empty(tuple(spec.shape), dtype=DTYPE_TO_TORCH[spec.dtype])


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a contiguous tensor as a flat uint8 tensor (no copy)."""
    if tensor.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=tensor.device)
    return tensor.reshape(-1).view(torch.uint8)


def bytes_checksum(data: torch.Tensor) -> int:
    """Checksum (services.tensors.checksum) of a flat CPU uint8 tensor."""
    if data.numel() == 0:
        return checksum(b"")
    return checksum(memoryview(data.numpy()))


def check_length(spec: common_pb2.TensorSpec, got: int) -> None:
    """A stored object shorter or longer than the spec means the sample cannot be trusted."""
    if got < spec.nbytes:
        raise FeatureLost(
            f"{spec.key}: short read, {got} of {spec.nbytes} bytes; recapture the sample"
        )
    if got > spec.nbytes:
        raise FeatureCorrupt(
            f"{spec.key}: stored object has {got} bytes, the spec says {spec.nbytes}; "
            "recapture the sample"
        )


def verify(spec: common_pb2.TensorSpec, data: torch.Tensor) -> None:
    """Raise ``FeatureCorrupt`` when the bytes do not hash to the spec's checksum."""
    got = bytes_checksum(data)
    if got != spec.checksum:
        raise FeatureCorrupt(
            f"{spec.key}: checksum {got:#018x} != spec {spec.checksum:#018x}; "
            "recapture the sample"
        )
