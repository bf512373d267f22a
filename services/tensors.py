"""The tensor-spec codec: dtypes, keys, checksums and the validation every receiver applies."""

from __future__ import annotations

import re

import torch
import xxhash

from services.api import common_pb2
from services.errors import InvalidArgument

DTYPE_TO_TORCH: dict[int, torch.dtype] = {
    common_pb2.DTYPE_BFLOAT16: torch.bfloat16,
    common_pb2.DTYPE_FLOAT16: torch.float16,
    common_pb2.DTYPE_FLOAT32: torch.float32,
    common_pb2.DTYPE_INT64: torch.int64,
    common_pb2.DTYPE_INT32: torch.int32,
    common_pb2.DTYPE_BOOL: torch.bool,
    common_pb2.DTYPE_UINT8: torch.uint8,
}
TORCH_TO_DTYPE: dict[torch.dtype, int] = {v: k for k, v in DTYPE_TO_TORCH.items()}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


_ITEMSIZE: dict[int, int] = {k: v.itemsize for k, v in DTYPE_TO_TORCH.items()}


def itemsize(dtype: int) -> int:
    return _ITEMSIZE[dtype]


def dtype_of(tensor: torch.Tensor) -> int:
    try:
        return TORCH_TO_DTYPE[tensor.dtype]
    except KeyError:
        supported = ", ".join(str(d) for d in TORCH_TO_DTYPE)
        raise InvalidArgument(
            f"dtype {tensor.dtype} is not supported; use one of {supported}"
        ) from None


def sample_prefix(store_id: str, run_id: str, sample_id: str) -> str:
    return f"{store_id}/{run_id}/{sample_id}/"


def make_key(store_id: str, run_id: str, sample_id: str, generation: int, name: str) -> str:
    """The feature-store key of one tensor: ``{store}/{run}/{sample}/g{generation}/{name}``."""
    return f"{sample_prefix(store_id, run_id, sample_id)}g{generation}/{name}"


def checksum(data: memoryview | bytes | bytearray) -> int:
    """XXH3-64 of the raw bytes: fast enough (about memcpy speed) to run on every write."""
    return xxhash.xxh3_64_intdigest(data)


def tensor_checksum(tensor: torch.Tensor) -> int:
    t = tensor.detach().contiguous().cpu()
    if t.numel() == 0:
        return checksum(b"")
    return checksum(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def validate_spec(spec: common_pb2.TensorSpec, where: str, key_prefix: str | None = None) -> None:
    """Raise ``InvalidArgument`` naming the field of ``spec`` that is malformed.

    ``where`` names the spec in the request (e.g. ``samples[3].ref.tensors[1]``).
    """
    if not spec.name or not _NAME_RE.match(spec.name):
        raise InvalidArgument(f"{where}.name: must be non-empty and match {_NAME_RE.pattern}")
    if spec.dtype == common_pb2.DTYPE_UNSPECIFIED:
        raise InvalidArgument(f"{where}.dtype: DTYPE_UNSPECIFIED is not allowed")
    if spec.dtype not in DTYPE_TO_TORCH:
        raise InvalidArgument(f"{where}.dtype: unknown value {spec.dtype}")
    if any(d < 0 for d in spec.shape):
        raise InvalidArgument(f"{where}.shape: negative dimension in {list(spec.shape)}")
    numel = 1
    for d in spec.shape:
        numel *= d
    expected = numel * itemsize(spec.dtype)
    if spec.nbytes != expected:
        raise InvalidArgument(
            f"{where}.nbytes: {spec.nbytes} != shape {list(spec.shape)} x itemsize "
            f"{itemsize(spec.dtype)} = {expected}"
        )
    if not spec.key:
        raise InvalidArgument(f"{where}.key: empty")
    if key_prefix is not None and not spec.key.startswith(key_prefix):
        raise InvalidArgument(f"{where}.key: {spec.key!r} is outside the prefix {key_prefix!r}")


def validate_specs(
    specs: list[common_pb2.TensorSpec] | object, where: str, key_prefix: str | None = None
) -> None:
    """Validate every spec and refuse duplicate names."""
    seen: set[str] = set()
    for i, spec in enumerate(specs):  # type: ignore[attr-defined]
        validate_spec(spec, f"{where}[{i}]", key_prefix)
        if spec.name in seen:
            raise InvalidArgument(f"{where}[{i}].name: duplicate tensor name {spec.name!r}")
        seen.add(spec.name)


def empty_like_spec(spec: common_pb2.TensorSpec, device: str | torch.device = "cpu",
                    pin_memory: bool = False) -> torch.Tensor:
    """Allocate an uninitialised tensor with the spec's dtype and shape."""
    return torch.empty(
        tuple(spec.shape), dtype=DTYPE_TO_TORCH[spec.dtype], device=device, pin_memory=pin_memory
    )
