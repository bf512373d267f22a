"""The EAGLE3 strategy: registry entry tying features, collation, model, loss and export."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from trainer.strategies.base import DraftSettings, FeatureSpec, StrategySpec
from trainer.strategies.eagle3 import collate, export, ttt
from trainer.strategies.eagle3.model import Eagle3Config, Eagle3Draft
from trainer.vocab import vocab_tensors

DEFAULT_DECAY = 0.8
"""Weight of unroll step k is decay**k: later steps are harder and matter less per token."""


def build_model(settings: DraftSettings) -> Eagle3Draft:
    """A freshly initialised draft (seeded) around the frozen target embedding."""
    target = settings.target
    d2t, t2d = vocab_tensors(settings.draft_token_ids, target.vocab_size)
    cfg = Eagle3Config.from_target(target.config, draft_vocab_size=int(d2t.numel()))
    if cfg.hidden_size != target.hidden_size:
        raise ValueError(
            f"target config hidden_size {cfg.hidden_size} != embedding width {target.hidden_size}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return Eagle3Draft(cfg, target.embed, d2t, t2d)


def _export(model: nn.Module, out_dir: Path, settings: DraftSettings) -> list[str]:
    draft = getattr(model, "module", model)
    dtype = settings.extra.get("export_dtype", torch.bfloat16)
    return export.write_export(draft, out_dir, settings.aux_layer_ids, dtype)


def spec(ttt_length: int = 7, decay: float = DEFAULT_DECAY) -> StrategySpec:
    """The EAGLE3 spec for a given unroll length."""
    if ttt_length < 1:
        raise ValueError(f"ttt_length={ttt_length}: must be >= 1")
    return StrategySpec(
        name="eagle3",
        features=(
            FeatureSpec("input_ids", rank=1, floating=False),
            FeatureSpec("loss_mask", rank=1, floating=False),
            FeatureSpec("aux_hidden_state", rank=2, floating=True),
            FeatureSpec("hidden_state", rank=2, floating=True),
        ),
        collate=collate.collate,
        normaliser=partial(ttt.normaliser, ttt_length=ttt_length),
        build_model=build_model,
        loss=partial(ttt.loss, ttt_length=ttt_length, decay=decay),
        summarise=partial(ttt.summarise, decay=decay),
        export=_export,
    )
