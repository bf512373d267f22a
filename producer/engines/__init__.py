"""Capture engines by name. Each entry imports its engine only when asked for, so choosing ``hf``
never imports SGLang and listing the names imports neither."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from producer.engines.base import CapturedFeatures, CaptureEngine, EngineConfig, EngineError
from services.store.base import FeatureStore


@dataclass(frozen=True)
class EngineContext:
    """What some engines need beyond the model: the producer's store and serving endpoints."""

    store: FeatureStore | None = None
    """The producer's feature store (engines that write features themselves use it)."""
    store_url: str = ""
    """The same store as a URL, for engine processes that open their own client."""
    server_urls: tuple[str, ...] = ()
    """sglang: running servers (``http://host:port``); empty starts SGLang in this process."""
    max_in_flight: int = 16
    """sglang over HTTP: most requests outstanding per server."""


def _hf(config: EngineConfig, context: EngineContext) -> CaptureEngine:
    from producer.engines.hf import HFEngine

    return HFEngine(config)


def _sglang(config: EngineConfig, context: EngineContext) -> CaptureEngine:
    from producer.engines.sglang import SGLangEngine, SGLangOptions

    if context.store is None:
        raise EngineError("the sglang engine writes features to the store itself; "
                          "pass the producer's store in EngineContext")
    return SGLangEngine(config, SGLangOptions(
        store=context.store, server_urls=context.server_urls, store_url=context.store_url,
        max_in_flight=context.max_in_flight))


ENGINES: dict[str, Callable[[EngineConfig, EngineContext], CaptureEngine]] = {
    "hf": _hf,
    "sglang": _sglang,
}


def create_engine(name: str, config: EngineConfig,
                  context: EngineContext | None = None) -> CaptureEngine:
    """Build the engine registered under ``name``."""
    try:
        factory = ENGINES[name]
    except KeyError:
        raise EngineError(f"unknown capture engine {name!r}; choose one of "
                          + ", ".join(sorted(ENGINES))) from None
    return factory(config, context or EngineContext())


__all__ = ["ENGINES", "CaptureEngine", "CapturedFeatures", "EngineConfig", "EngineContext",
           "EngineError", "create_engine"]
