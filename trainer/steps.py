"""Where step bundles come from: a ``StepSource`` yields this rank's slice of each step.

The coordinator's ``StreamSteps`` client is one source; ``InProcessSteps`` (features already in
memory, same slicing rule) is another, used by tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from trainer.strategies.base import Features


@dataclass(frozen=True)
class Geometry:
    """Step geometry: a step reads ``world_size x micro_batch x accumulation`` samples."""

    world_size: int = 1
    micro_batch: int = 1
    accumulation: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "micro_batch", "accumulation"):
            if getattr(self, name) < 1:
                raise ValueError(f"step.{name}={getattr(self, name)}: must be >= 1")

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.accumulation

    @property
    def per_step(self) -> int:
        return self.world_size * self.per_rank


@dataclass(frozen=True)
class StepBundle:
    """This rank's samples for optimizer step ``step`` (steps count from 1)."""

    step: int
    samples: Sequence[Features]
    """``micro_batch x accumulation`` samples, in micro-batch order."""


class StepSource(Protocol):
    """Yields this rank's bundles in increasing step order, starting at ``from_step``."""

    def steps(self, from_step: int) -> Iterator[StepBundle]: ...


def rank_slice(bundle: Sequence[Features], geometry: Geometry, rank: int) -> Sequence[Features]:
    """Rank ``rank``'s contiguous share of a full step bundle."""
    if len(bundle) != geometry.per_step:
        raise ValueError(f"bundle has {len(bundle)} samples, geometry needs {geometry.per_step}")
    n = geometry.per_rank
    return bundle[rank * n : (rank + 1) * n]


class InProcessSteps:
    """Steps cut from an in-memory list of samples in order; the tail that cannot fill a step
    is left out (and reported by ``dropped``), as the coordinator does."""

    def __init__(self, samples: Sequence[Features], geometry: Geometry, rank: int = 0) -> None:
        if not 0 <= rank < geometry.world_size:
            raise ValueError(f"rank {rank} outside world_size {geometry.world_size}")
        self.samples, self.geometry, self.rank = samples, geometry, rank
        self.num_steps = len(samples) // geometry.per_step
        self.dropped = len(samples) - self.num_steps * geometry.per_step

    def steps(self, from_step: int = 1) -> Iterator[StepBundle]:
        per = self.geometry.per_step
        for step in range(max(from_step, 1), self.num_steps + 1):
            bundle = self.samples[(step - 1) * per : step * per]
            yield StepBundle(step, rank_slice(bundle, self.geometry, self.rank))
