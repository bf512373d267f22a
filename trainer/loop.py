"""The training loop: step bundles in, optimizer steps, periodic atomic checkpoints out."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.logs import event
from trainer import checkpoint as ckpt
from trainer.config import TrainerConfig
from trainer.optim import build_optimizer, build_scheduler
from trainer.parallel import (
    DistContext,
    Mode,
    all_reduce_sum,
    barrier,
    full_state,
    grad_sync,
    load_full_state,
    parallelize,
)
from trainer.steps import StepBundle, StepSource
from trainer.strategies import get_strategy
from trainer.strategies.base import DraftSettings, StepContext, StrategySpec
from trainer.target_head import TargetHead, load_target_head

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]
CheckpointCallback = Callable[[int, Path], None]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Trains one draft model from step bundles; one instance per rank.

    ``step`` is the last optimizer step applied (0 before the first); bundles must arrive in
    order, ``step + 1`` first.
    """

    def __init__(
        self,
        cfg: TrainerConfig,
        strategy: StrategySpec,
        model: nn.Module,
        head: TargetHead,
        settings: DraftSettings,
        dist_ctx: DistContext | None = None,
        checkpoint_dir: str | Path | None = None,
    ) -> None:
        self.cfg, self.strategy, self.model, self.settings = cfg, strategy, model, settings
        self.dist = dist_ctx or DistContext()
        self.head = head.to(self.dist.device)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.trainer_group = ""
        """The coordinator trainer group these checkpoints belong to ("" when training alone)."""
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.step = 0
        self.last_metrics: dict[str, float] = {}
        self.label_counts: torch.Tensor | None = None
        """Targets seen per draft token, summed over the steps trained here (for the
        always-guess-the-most-frequent-token baseline)."""

    # -- one optimizer step ---------------------------------------------------------------
    def train_step(self, bundle: StepBundle) -> dict[str, float]:
        """Apply the optimizer step for ``bundle`` and return its metrics (reduced over ranks)."""
        geo = self.cfg.geometry
        if bundle.step != self.step + 1:
            raise ValueError(
                f"got step {bundle.step}, expected {self.step + 1}: steps must arrive in order"
            )
        if len(bundle.samples) != geo.per_rank:
            raise ValueError(
                f"step {bundle.step}: {len(bundle.samples)} samples on this rank, geometry needs "
                f"micro_batch x accumulation = {geo.per_rank}"
            )
        start = time.perf_counter()
        device = self.dist.device
        micro = [
            {k: v.to(device, non_blocking=True) for k, v in self.strategy.collate(
                bundle.samples[i * geo.micro_batch : (i + 1) * geo.micro_batch]).items()}
            for i in range(geo.accumulation)
        ]
        if self.strategy.prepare is not None:
            micro = [self.strategy.prepare(mb, self.row_seeds(bundle.step, i).to(device))
                     for i, mb in enumerate(micro)]
        ctx = StepContext(completed_steps=self.step, total_steps=self.cfg.total_steps)
        norm = all_reduce_sum(sum(self.strategy.normaliser(mb) for mb in micro), self.dist)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for i, mb in enumerate(micro):
            with grad_sync(self.model, enabled=i == len(micro) - 1):
                out = self.strategy.loss(self.model, self.head, mb, norm, ctx)
                # The loss is already divided by the step-wide count; data parallelism averages
                # gradients over ranks, so scale back to a plain sum.
                (out.loss * self.dist.world_size).backward()
            for k, v in out.sums.items():
                sums[k] = sums[k] + v.detach() if k in sums else v.detach().clone()
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step = bundle.step
        for v in sums.values():
            all_reduce_sum(v, self.dist)
        metrics = self.strategy.summarise({k: v.cpu() for k, v in sums.items()})
        metrics.update(lr=lr, grad_norm=float(grad_norm), step_seconds=time.perf_counter() - start)
        if "label_counts" in sums:
            counts = sums["label_counts"].cpu()
            self.label_counts = counts if self.label_counts is None else self.label_counts + counts
            metrics["majority_acc"] = float(
                self.label_counts.max() / self.label_counts.sum().clamp(min=1))
        self.last_metrics = metrics
        return metrics

    def row_seeds(self, step: int, micro_index: int) -> torch.Tensor:
        """One seed per row of micro-batch ``micro_index`` of ``step``: a function of the run
        seed, the step and the row's place in the whole step (not of the rank layout)."""
        geo = self.cfg.geometry
        first = self.dist.rank * geo.per_rank + micro_index * geo.micro_batch
        rows = torch.arange(first, first + geo.micro_batch, dtype=torch.int64)
        # A fixed odd-multiplier mix keeps seeds distinct across steps, rows and run seeds.
        return (self.cfg.seed * 1_000_003 + step) * 1_000_033 + rows

    # -- the loop ---------------------------------------------------------------------------
    def run(
        self,
        source: StepSource,
        max_steps: int | None = None,
        on_step: StepCallback | None = None,
        on_checkpoint: CheckpointCallback | None = None,
    ) -> int:
        """Train from ``source`` starting at ``step + 1``; checkpoint every ``checkpoint_every``.

        Stops after ``max_steps`` (the absolute step number) or when the source ends; returns
        the last step applied.
        """
        for bundle in source.steps(self.step + 1):
            if max_steps is not None and bundle.step > max_steps:
                break
            metrics = self.train_step(bundle)
            if on_step is not None:
                on_step(self.step, metrics)
            if self.checkpoint_dir is not None and self.step % self.cfg.checkpoint_every == 0:
                path = self.save_checkpoint()
                if on_checkpoint is not None and path is not None:
                    on_checkpoint(self.step, path)
            if max_steps is not None and self.step >= max_steps:
                break
        return self.step

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, scheduler, RNG and step: everything resume needs (collective)."""
        model_sd, optim_sd = full_state(self.model, self.optimizer)
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.step = int(state["step"])

    def save_checkpoint(self) -> Path | None:
        """Write the checkpoint for the current step (rank 0 writes; all ranks wait)."""
        if self.checkpoint_dir is None:
            raise ValueError("no checkpoint directory configured; pass checkpoint_dir")
        state = self.state_dict()
        path = None
        if self.dist.rank == 0:
            meta = {"algorithm": self.strategy.name, "world_size": self.dist.world_size,
                    "trainer_group": self.trainer_group}
            path = ckpt.save_checkpoint(self.checkpoint_dir, self.step, state, meta)
            log.info("checkpoint written",
                     extra=event("checkpoint", step=self.step, path=str(path)))
        barrier(self.dist)
        return path or ckpt.checkpoint_path(self.checkpoint_dir, self.step)

    def resume(self) -> int:
        """Load the latest complete checkpoint, if any; return the step it restored (or 0)."""
        if self.checkpoint_dir is None:
            return self.step
        path = ckpt.latest_complete(self.checkpoint_dir)
        if path is None:
            return self.step
        return self.load_checkpoint(path)

    def load_checkpoint(self, path: str | Path) -> int:
        """Restore the checkpoint directory ``path``; return the step it holds."""
        path = Path(path)
        state, meta = ckpt.load_checkpoint(path)
        if meta.get("algorithm") != self.strategy.name:
            raise ValueError(
                f"{path} holds a {meta.get('algorithm')!r} checkpoint, this trainer runs "
                f"{self.strategy.name!r}; use another checkpoint directory"
            )
        self.load_state_dict(state)
        log.info("resumed", extra=event("resume", step=self.step, path=str(path)))
        return self.step


def build_trainer(
    cfg: TrainerConfig,
    target_dir: str | Path,
    draft_token_ids: Sequence[int],
    aux_layer_ids: Sequence[int],
    dist_ctx: DistContext | None = None,
    parallel: Mode = "ddp",
    checkpoint_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> Trainer:
    """Load the target head, build the seeded draft, wrap it, and return a ready trainer."""
    dist_ctx = dist_ctx or DistContext()
    head = load_target_head(target_dir, dtype=dtype)
    strategy = get_strategy(cfg.algorithm, **cfg.strategy_options())
    settings = DraftSettings(
        target=head, draft_token_ids=list(draft_token_ids), aux_layer_ids=list(aux_layer_ids),
        ttt_length=cfg.ttt_length, seed=cfg.seed,
    )
    model = strategy.build_model(settings).to(dtype)
    model = parallelize(model, parallel, dist_ctx)
    return Trainer(cfg, strategy, model, head, settings, dist_ctx, checkpoint_dir)
