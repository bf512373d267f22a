"""What a draft strategy provides to the trainer: one typed spec per algorithm.

The trainer loop only speaks this interface, so a new algorithm (DFlash, Domino) is one more
``StrategySpec`` in the registry, not a new launcher.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.target_head import TargetHead

Features = Mapping[str, torch.Tensor]
"""One sample's tensors, by feature name (as stored in the feature store)."""

Batch = dict[str, torch.Tensor]
"""A collated micro-batch."""


@dataclass(frozen=True)
class FeatureSpec:
    """One tensor a strategy reads per sample."""

    name: str
    """Feature-store tensor name."""
    rank: int
    """Number of dimensions; the first is always the sequence length."""
    floating: bool
    """Whether the tensor is a floating-point feature (stored in the model dtype)."""


@dataclass(frozen=True)
class DraftSettings:
    """Everything a strategy needs to build its draft model."""

    target: TargetHead
    draft_token_ids: Sequence[int]
    aux_layer_ids: Sequence[int]
    ttt_length: int = 7
    seed: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepContext:
    """Where the optimizer step being computed stands in the run (for schedule-dependent losses)."""

    completed_steps: int = 0
    """Optimizer steps applied before this one; constant across its micro-batches."""
    total_steps: int | None = None
    """The run's optimizer-step horizon, when known (``training.total_steps``)."""


@dataclass
class LossOutput:
    """The differentiable loss of one micro-batch plus summed (not averaged) metric counts."""

    loss: torch.Tensor
    sums: dict[str, torch.Tensor]
    """Metric numerators and denominators, summed over the micro-batch; reduced across ranks."""


@dataclass(frozen=True)
class StrategySpec:
    """A draft algorithm: features, collation, model, loss and export."""

    name: str
    features: tuple[FeatureSpec, ...]
    collate: Callable[[Sequence[Features]], Batch]
    """Pad and stack a micro-batch of samples."""
    normaliser: Callable[[Batch], torch.Tensor]
    """Per-batch counts the loss is divided by once summed over the whole step (all ranks)."""
    build_model: Callable[[DraftSettings], nn.Module]
    loss: Callable[[nn.Module, TargetHead, Batch, torch.Tensor, StepContext], LossOutput]
    """(model, frozen target head, batch, step-wide normaliser, step context) -> loss and
    metric sums."""
    summarise: Callable[[Mapping[str, torch.Tensor]], dict[str, float]]
    """Turn step-wide metric sums into reported metrics."""
    export: Callable[[nn.Module, Path, DraftSettings], list[str]]
    """Write the servable files into a directory; return the tensor names written."""
    prepare: Callable[[Batch, torch.Tensor], Batch] | None = None
    """Optional: complete a collated micro-batch before the normaliser and loss see it, given
    one int64 seed per row (derived from the run seed, the step and the row's place in the
    whole step, so the result does not depend on ranks, batching or where features came from).
    Strategies that sample per row (DFlash's anchors) do it here."""
