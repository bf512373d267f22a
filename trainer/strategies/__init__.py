"""The strategy registry: a plain mapping from algorithm name to a function returning its spec."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trainer.strategies.base import StrategySpec


def _eagle3(**options: Any) -> StrategySpec:
    from trainer.strategies.eagle3 import spec

    return spec(**options)


def _dflash(**options: Any) -> StrategySpec:
    from trainer.strategies.dflash import spec

    return spec(**options)


def _domino(**options: Any) -> StrategySpec:
    from trainer.strategies.dflash import domino_spec

    return domino_spec(**options)


STRATEGIES: dict[str, Callable[..., StrategySpec]] = {
    "dflash": _dflash,
    "domino": _domino,
    "eagle3": _eagle3,
}


def get_strategy(name: str, **options: Any) -> StrategySpec:
    """Return the spec for ``name`` (the run config's ``draft.algorithm``).

    ``options`` go to the strategy's factory (for EAGLE3: ``ttt_length``, ``decay``; for DFlash
    and Domino: the fields of ``DFlashOptions`` / ``DominoOptions``).
    """
    try:
        factory = STRATEGIES[name]
    except KeyError:
        known = ", ".join(sorted(STRATEGIES))
        raise ValueError(f"unknown draft algorithm {name!r}; use one of: {known}") from None
    return factory(**options)
