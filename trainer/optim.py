"""AdamW over the trainable parameters and a linear warm-up schedule."""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import TrainerConfig


def build_optimizer(model: nn.Module, cfg: TrainerConfig) -> torch.optim.AdamW:
    """AdamW over parameters that require gradients (frozen target weights are buffers)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach=False: the same per-parameter kernels on every run, for bitwise CPU resume checks.
    return torch.optim.AdamW(
        params, lr=cfg.learning_rate, betas=cfg.betas, weight_decay=cfg.weight_decay,
        foreach=False,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainerConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate ``lr * min(1, (n+1)/warmup)`` at optimizer step n (0-based)."""
    warmup = cfg.warmup_steps

    def factor(n: int) -> float:
        return 1.0 if warmup == 0 else min(1.0, (n + 1) / warmup)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
