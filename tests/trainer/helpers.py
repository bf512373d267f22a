"""Shared builders for trainer tests."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from trainer.config import TrainerConfig
from trainer.loop import Trainer, build_trainer
from trainer.parallel import DistContext, Mode
from trainer.steps import Geometry


def make_trainer(tiny, geometry: Geometry | None = None, checkpoint_dir: Path | None = None,
                 dist_ctx: DistContext | None = None, parallel: Mode = "none",
                 **overrides) -> Trainer:
    cfg = TrainerConfig(learning_rate=overrides.pop("learning_rate", 3e-3),
                        warmup_steps=overrides.pop("warmup_steps", 3),
                        geometry=geometry or Geometry(1, 2, 2),
                        checkpoint_every=overrides.pop("checkpoint_every", 5), seed=7, **overrides)
    return build_trainer(cfg, tiny.target_dir, tiny.draft_token_ids, tiny.aux_layer_ids,
                         dist_ctx=dist_ctx, parallel=parallel, checkpoint_dir=checkpoint_dir)


def trainable_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    model = getattr(trainer.model, "module", trainer.model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_rank(body: Callable[[], None]) -> None:
    """Run a spawned rank's ``body``, then leave the process at once.

    A DDP reducer and its gloo process group torn down at interpreter exit can deadlock (a gloo
    thread waits for the GIL the destructor holds), so the rank skips Python's teardown: it
    exits 0 after ``body`` and 1 after printing its traceback."""
    code = 1
    try:
        body()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)
