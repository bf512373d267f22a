"""The DFlash and Domino strategies: registry entries tying features, collation, anchors, model,
loss and export.

Public API: ``spec`` / ``domino_spec`` (the factories behind ``get_strategy("dflash" |
"domino", **options)``), ``validate_options`` (run creation), ``linear_lambda_base`` (Domino's
base-loss schedule).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.strategies.base import DraftSettings, FeatureSpec, StrategySpec
from trainer.strategies.dflash import anchors, collate, export, objective
from trainer.strategies.dflash.config import (
    DFlashConfig,
    DFlashOptions,
    DominoOptions,
    parse_options,
    validate_options,
)
from trainer.strategies.dflash.model import DFlashDraft, DominoDraft
from trainer.strategies.dflash.objective import linear_lambda_base

__all__ = [
    "DFlashConfig",
    "DFlashDraft",
    "DFlashOptions",
    "DominoDraft",
    "DominoOptions",
    "domino_spec",
    "linear_lambda_base",
    "spec",
    "validate_options",
]

FEATURES = (
    FeatureSpec("input_ids", rank=1, floating=False),
    FeatureSpec("loss_mask", rank=1, floating=False),
    FeatureSpec("hidden_states", rank=2, floating=True),
)


def build_model(settings: DraftSettings, options: DFlashOptions) -> DFlashDraft:
    """A freshly initialised draft (seeded) shaped by the target and the run's options."""
    target = settings.target
    cfg = DFlashConfig.from_target(target.config, options, settings.aux_layer_ids)
    if not cfg.target_layer_ids:
        raise ValueError("no target layer ids: a DFlash draft reads at least one captured layer")
    if cfg.hidden_size != target.hidden_size:
        raise ValueError(f"target config hidden_size {cfg.hidden_size} != embedding width "
                         f"{target.hidden_size}")
    if cfg.vocab_size != target.vocab_size:
        raise ValueError(f"target config vocab_size {cfg.vocab_size} != embedding rows "
                         f"{target.vocab_size}")
    if cfg.mask_token_id >= cfg.vocab_size:
        raise ValueError(f"mask_token_id={cfg.mask_token_id}: must be < the target's vocab_size "
                         f"{cfg.vocab_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return DominoDraft(cfg) if cfg.is_domino else DFlashDraft(cfg)


def _export(model: nn.Module, out_dir: Path, settings: DraftSettings) -> list[str]:
    draft = getattr(model, "module", model)
    expected = [int(i) for i in settings.aux_layer_ids]
    if list(draft.config.target_layer_ids) != expected:
        raise ValueError(f"the draft reads target layers {list(draft.config.target_layer_ids)}, "
                         f"the run captured {expected}")
    dtype = settings.extra.get("export_dtype", torch.bfloat16)
    return export.write_export(draft, out_dir, dtype)


def _spec(algorithm: str, options: dict[str, Any]) -> StrategySpec:
    parsed = parse_options(algorithm, options)
    domino = isinstance(parsed, DominoOptions)
    shift = domino and parsed.shift_label
    lambda_args = (dict(lambda_start=parsed.lambda_base_start,
                        lambda_ratio=parsed.lambda_base_decay_ratio) if domino else {})
    return StrategySpec(
        name=algorithm,
        features=FEATURES,
        collate=collate.collate,
        normaliser=anchors.normaliser,
        build_model=partial(build_model, options=parsed),
        loss=partial(objective.loss, domino=domino, **lambda_args),
        summarise=partial(objective.summarise, first_position=0 if shift else 1,
                          domino=domino),
        export=_export,
        prepare=partial(anchors.prepare, block_size=parsed.block_size,
                        num_anchors=parsed.num_anchors, gamma=float(parsed.loss_decay_gamma),
                        shift_label=shift),
    )


def spec(**options: Any) -> StrategySpec:
    """The DFlash spec; ``options`` are ``DFlashOptions`` fields (``mask_token_id`` required)."""
    return _spec("dflash", options)


def domino_spec(**options: Any) -> StrategySpec:
    """The Domino spec; ``options`` are ``DominoOptions`` fields (``mask_token_id``,
    ``emb_dim`` and ``gru_hidden_dim`` required)."""
    return _spec("domino", options)
