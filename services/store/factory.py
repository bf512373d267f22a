"""``open_store(url)``: the one way services obtain a feature store.

- ``memory://NAME?store_id=ID&capacity_mb=N&verify=1``
- ``mooncake://MASTER_HOST:PORT?store_id=ID&local=HOST&metadata=P2PHANDSHAKE&protocol=tcp
  &device=&segment_mb=0&buffer_mb=256&placement=local&verify=1``
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from services.errors import InvalidArgument
from services.store.base import FeatureStore

if TYPE_CHECKING:
    from services.store.mooncake import MooncakeConfig

_MEMORY_PARAMS = {"store_id", "capacity_mb", "verify"}
_MOONCAKE_PARAMS = {
    "store_id", "local", "metadata", "protocol", "device", "segment_mb", "buffer_mb",
    "placement", "verify", "retries",
}


def _params(url: str, allowed: set[str]) -> dict[str, str]:
    query = parse_qs(urlsplit(url).query, keep_blank_values=True)
    unknown = set(query) - allowed
    if unknown:
        raise InvalidArgument(
            f"store url {url!r}: unknown parameter(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    return {k: v[-1] for k, v in query.items()}


def _int(params: dict[str, str], name: str, default: int) -> int:
    try:
        return int(params.get(name, default))
    except ValueError:
        raise InvalidArgument(f"store url: {name}={params[name]!r} is not an integer") from None


def _bool(params: dict[str, str], name: str, default: bool) -> bool:
    value = params.get(name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise InvalidArgument(f"store url: {name}={value!r}; use 1 or 0")


def open_store(url: str) -> FeatureStore:
    """Open the feature store named by ``url`` (see docs/feature-store.md)."""
    parts = urlsplit(url)
    if parts.scheme == "memory":
        from services.store.memory import MemoryStore

        params = _params(url, _MEMORY_PARAMS)
        name = parts.netloc + parts.path
        if not name:
            raise InvalidArgument(f"store url {url!r}: name the store, e.g. memory://features")
        return MemoryStore(
            name,
            store_id=params.get("store_id") or None,
            capacity_bytes=_int(params, "capacity_mb", 0) << 20,
            verify=_bool(params, "verify", True),
        )
    if parts.scheme == "mooncake":
        from services.store.mooncake import MooncakeStore

        return MooncakeStore(mooncake_config(url))
    raise InvalidArgument(f"store url {url!r}: scheme must be memory:// or mooncake://")


def mooncake_config(url: str) -> MooncakeConfig:
    """The settings a ``mooncake://`` store URL names, validated; nothing is opened."""
    from services.store.mooncake import MooncakeConfig

    parts = urlsplit(url)
    if parts.scheme != "mooncake":
        raise InvalidArgument(f"store url {url!r}: not a mooncake:// URL")
    params = _params(url, _MOONCAKE_PARAMS)
    if not parts.netloc:
        raise InvalidArgument(f"store url {url!r}: give the master, mooncake://HOST:PORT")
    return MooncakeConfig(
        master=parts.netloc,
        store_id=params.get("store_id") or "draftflow",
        local_host=params.get("local") or "127.0.0.1",
        metadata=params.get("metadata") or "P2PHANDSHAKE",
        protocol=params.get("protocol") or "tcp",
        device=params.get("device", ""),
        segment_mb=_int(params, "segment_mb", 0),
        buffer_mb=_int(params, "buffer_mb", 256),
        placement=params.get("placement") or "local",
        verify=_bool(params, "verify", True),
        retries=_int(params, "retries", 3),
    )
