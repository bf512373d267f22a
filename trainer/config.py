"""The trainer's typed configuration, validated where it is built."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.api import run_pb2
from trainer.steps import Geometry


@dataclass(frozen=True)
class TrainerConfig:
    """Optimisation and checkpoint settings of one trainer."""

    learning_rate: float = 1e-4
    """Peak AdamW learning rate."""
    warmup_steps: int = 0
    """Linear warm-up from lr/warmup_steps to lr over this many steps; constant afterwards."""
    max_grad_norm: float = 0.5
    """Clip the global gradient norm to this; 0 disables clipping."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    checkpoint_every: int = 100
    """Write a checkpoint after every this many optimizer steps."""
    seed: int = 0
    """Seeds the draft's initialisation and the RNGs saved in checkpoints."""
    algorithm: str = "eagle3"
    """Strategy name in ``trainer.strategies``."""
    ttt_length: int = 7
    """Training-time-test unroll length."""
    geometry: Geometry = field(default_factory=Geometry)
    """World size, micro-batch and accumulation."""
    total_steps: int | None = None
    """The run's optimizer-step horizon, for schedules (Domino's lambda); None when unknown."""
    draft_options: Mapping[str, Any] = field(default_factory=dict)
    """The DFlash family's draft settings (``draft.dflash`` and ``draft.domino`` fields)."""

    def strategy_options(self) -> dict[str, Any]:
        """Keyword arguments of the strategy's factory in the registry."""
        if self.algorithm == "eagle3":
            return {"ttt_length": self.ttt_length}
        return dict(self.draft_options)

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate}: must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be >= 0")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm}: must be >= 0 (0 disables)")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={self.checkpoint_every}: must be >= 1")
        if self.ttt_length < 1:
            raise ValueError(f"ttt_length={self.ttt_length}: must be >= 1")

    @classmethod
    def from_run(cls, run: run_pb2.RunConfig) -> TrainerConfig:
        """The settings a run's ``RunConfig`` fixes for every trainer of the run."""
        t, s, d = run.training, run.step, run.draft
        return cls(
            learning_rate=t.learning_rate or cls.learning_rate,
            warmup_steps=t.warmup_steps,
            max_grad_norm=t.max_grad_norm,
            checkpoint_every=t.checkpoint_every or cls.checkpoint_every,
            seed=t.seed,
            algorithm=d.algorithm or cls.algorithm,
            ttt_length=d.ttt_length or cls.ttt_length,
            geometry=Geometry(s.world_size or 1, s.micro_batch or 1, s.accumulation or 1),
            total_steps=t.total_steps or None,
            draft_options=draft_options(d),
        )


def draft_options(draft: run_pb2.DraftConfig) -> dict[str, Any]:
    """The wire ``draft.dflash`` / ``draft.domino`` settings as strategy factory options."""
    if not draft.HasField("dflash"):
        return {}
    f = draft.dflash
    options: dict[str, Any] = {
        "num_hidden_layers": f.num_hidden_layers, "block_size": f.block_size,
        "num_anchors": f.num_anchors, "loss_decay_gamma": f.loss_decay_gamma,
        "mask_token_id": f.mask_token_id, "layer_types": list(f.layer_types) or None,
        "sliding_window": f.sliding_window, "attention_backend": f.attention_backend or "sdpa",
        "objective_chunk_blocks": f.objective_chunk_blocks,
    }
    if draft.HasField("domino"):
        m = draft.domino
        options.update(emb_dim=m.emb_dim, gru_hidden_dim=m.gru_hidden_dim,
                       shift_label=m.shift_label, pure_draft_prefix_len=m.pure_draft_prefix_len,
                       lambda_base_start=m.lambda_base_start,
                       lambda_base_decay_ratio=m.lambda_base_decay_ratio)
    return options
