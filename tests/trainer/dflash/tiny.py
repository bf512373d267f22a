"""Tiny targets, drafts and samples for the DFlash/Domino tests (CPU, float64 where exact)."""

from __future__ import annotations

from typing import Any

import torch

from trainer.strategies import get_strategy
from trainer.strategies.base import DraftSettings, StrategySpec
from trainer.target_head import TargetHead

HIDDEN = 32
VOCAB = 96
MASK_ID = VOCAB - 1
LAYER_IDS = [1, 2]


def target_config(**overrides: Any) -> dict[str, Any]:
    """An HF-style text config of a 4-layer target (head_dim absent: H / heads)."""
    cfg = dict(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=48, rms_norm_eps=1e-6, vocab_size=VOCAB, num_hidden_layers=4,
               max_position_embeddings=512, rope_theta=10000.0, attention_bias=False)
    cfg.update(overrides)
    return cfg


def target_head(seed: int = 0, dtype: torch.dtype = torch.float64) -> TargetHead:
    gen = torch.Generator().manual_seed(seed)
    embed = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=dtype)
    lm_head = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=dtype) * 0.3
    return TargetHead(embed, lm_head, target_config())


def settings(head: TargetHead, seed: int = 3, **extra: Any) -> DraftSettings:
    return DraftSettings(target=head, draft_token_ids=[], aux_layer_ids=LAYER_IDS, seed=seed,
                         extra=extra)


def domino_options(**overrides: Any) -> dict[str, Any]:
    opts: dict[str, Any] = dict(mask_token_id=MASK_ID, block_size=4, num_anchors=6,
                                emb_dim=12, gru_hidden_dim=8)
    opts.update(overrides)
    return opts


def build(algorithm: str, head: TargetHead, dtype: torch.dtype = torch.float64,
          **options: Any) -> tuple[StrategySpec, torch.nn.Module]:
    opts = domino_options(**options) if algorithm == "domino" else {
        "mask_token_id": MASK_ID, "block_size": 4, "num_anchors": 6, **options}
    spec = get_strategy(algorithm, **opts)
    model = spec.build_model(settings(head)).to(dtype)
    return spec, model


def sample(length: int, seed: int, supervised_from: int = 0,
           dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Random tokens and features; ``loss_mask`` 1 from ``supervised_from`` on."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(length, dtype=torch.uint8)
    mask[supervised_from:] = 1
    return {"input_ids": torch.randint(0, VOCAB - 1, (length,), generator=gen),
            "loss_mask": mask,
            "hidden_states": torch.randn(length, len(LAYER_IDS) * HIDDEN, generator=gen,
                                         dtype=dtype)}
