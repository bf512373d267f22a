"""Capture engines by name. Each entry imports its engine only when asked for, so choosing ``hf``
never imports SGLang and listing the names imports neither."""

from __future__ import annotations

from collections.abc import Callable

from producer.engines.base import CapturedFeatures, CaptureEngine, EngineConfig, EngineError


def _hf(config: EngineConfig) -> CaptureEngine:
    from producer.engines.hf import HFEngine

    return HFEngine(config)


ENGINES: dict[str, Callable[[EngineConfig], CaptureEngine]] = {"hf": _hf}


def create_engine(name: str, config: EngineConfig) -> CaptureEngine:
    """Build the engine registered under ``name``."""
    try:
        factory = ENGINES[name]
    except KeyError:
        raise EngineError(f"unknown capture engine {name!r}; choose one of "
                          + ", ".join(sorted(ENGINES))) from None
    return factory(config)


__all__ = ["ENGINES", "CaptureEngine", "CapturedFeatures", "EngineConfig", "EngineError",
           "create_engine"]
