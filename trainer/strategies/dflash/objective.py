"""DFlash/Domino loss and metrics.

Loss: ``Σ CE · weight`` over the micro-batch's block slots, divided by the step-wide normaliser
(``Σ weight`` over every micro-batch of every rank), so the optimizer step minimises a
token-weighted mean. Domino mixes its final and base heads, each normalised the same way:
``(1 - λ) · CE_final + λ · CE_base`` with λ from ``linear_lambda_base``.

Logits are full-vocabulary, so the objective runs over chunks of blocks, each under activation
checkpointing: only one chunk's logits exist at a time, in the forward and in the backward.

Metrics are sums (reduced over ranks, then ``summarise``): per-position hits and counts, the
labels' histogram and a simulated acceptance length: per block, 1 + the number of leading
positions whose argmax is the label, positions without supervision being transparent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.strategies.base import Batch, LossOutput, StepContext
from trainer.target_head import TargetHead

HeadFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(hidden [B,n,bs,H], block_ids [B,n,bs]) -> (final logits, base logits), [B,n,bs,V] each."""

TERMS = ("ce", "ce_base", "correct_pos", "base_correct_pos", "count_pos", "accept_sum",
         "base_accept_sum", "accept_blocks", "label_counts")
"""Names of the tensors ``block_terms`` returns, in order."""


def linear_lambda_base(step: int, total: int, start: float = 1.0, ratio: float = 1.0) -> float:
    """Weight of Domino's base-head loss after ``step`` of ``total`` optimizer steps: from
    ``start`` linearly to 0 at ``int(total · ratio)`` steps, then 0; clamped to [0, 1]."""
    span = max(1, int(total * ratio))
    return min(max(start * (1.0 - min(step / span, 1.0)), 0.0), 1.0)


def accept_lengths(hit: torch.Tensor, supervised: torch.Tensor) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """Σ simulated accept length over blocks with any supervised slot, and their count."""
    run = torch.cumprod((hit | ~supervised).to(torch.int64), dim=-1) * supervised
    scored = supervised.any(-1)
    return ((1 + run.sum(-1)) * scored).sum().to(torch.float64), scored.sum().to(torch.float64)


def _chunk_terms(head_fn: HeadFn, with_base: bool, vocab: int, hidden: torch.Tensor,
                 block_ids: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                 supervised: torch.Tensor) -> tuple[torch.Tensor, ...]:
    final, base = head_fn(hidden, block_ids)
    ce_dtype = torch.promote_types(final.dtype, torch.float32)

    def ce_sum(logits: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.to(ce_dtype).flatten(0, 2), labels.flatten(),
                             reduction="none")
        return (ce * weight.flatten().to(ce_dtype)).sum()

    ce = ce_sum(final)
    ce_base = ce_sum(base) if with_base else ce.new_zeros(())
    with torch.no_grad():
        hit = (final.argmax(-1) == labels) & supervised
        base_hit = (base.argmax(-1) == labels) & supervised
        accept, blocks = accept_lengths(hit, supervised)
        base_accept, _ = accept_lengths(base_hit, supervised)
        counts = torch.bincount(labels[supervised], minlength=vocab).to(torch.float64)
    return (ce, ce_base, hit.sum((0, 1)).double(), base_hit.sum((0, 1)).double(),
            supervised.sum((0, 1)).double(), accept, base_accept, blocks, counts)


def block_terms(head_fn: HeadFn, hidden: torch.Tensor, block_ids: torch.Tensor,
                labels: torch.Tensor, weight: torch.Tensor, supervised: torch.Tensor, *,
                vocab: int, chunk_blocks: int, with_base: bool) -> dict[str, torch.Tensor]:
    """Objective sums over all blocks (``TERMS``); ``ce`` / ``ce_base`` carry gradients.

    With ``chunk_blocks`` > 0 the blocks are taken that many at a time, each chunk recomputed in
    the backward instead of keeping its logits."""
    n = hidden.shape[1]
    size = chunk_blocks if chunk_blocks > 0 else n
    totals: list[torch.Tensor] | None = None
    for start in range(0, n, size):
        part = [t[:, start : start + size] for t in (hidden, block_ids, labels, weight,
                                                     supervised)]
        args = (head_fn, with_base, vocab, *part)
        if chunk_blocks > 0 and torch.is_grad_enabled():
            terms = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            terms = _chunk_terms(*args)
        totals = list(terms) if totals is None else [a + b for a, b in zip(totals, terms,
                                                                           strict=True)]
    assert totals is not None
    return dict(zip(TERMS, totals, strict=True))


def _model_terms(model: torch.nn.Module, head: TargetHead, batch: Batch,
                 prefix: str) -> dict[str, torch.Tensor]:
    return model(batch["hidden_states"], batch[f"{prefix}block_ids"],
                 batch[f"{prefix}anchors"], batch[f"{prefix}keep"], batch[f"{prefix}labels"],
                 batch[f"{prefix}weight"], batch[f"{prefix}supervised"], head.embed,
                 head.lm_head)


def loss(model: torch.nn.Module, head: TargetHead, batch: Batch, norm: torch.Tensor,
         ctx: StepContext | None = None, *, domino: bool = False, lambda_start: float = 1.0,
         lambda_ratio: float = 1.0) -> LossOutput:
    """The step-normalised loss of a prepared micro-batch and its metric sums."""
    if domino:
        if ctx is None or not ctx.total_steps:
            raise ValueError(
                "Domino's lambda_base schedule needs the run's optimizer-step horizon "
                "(training.total_steps); it is unknown for this step")
        lam = linear_lambda_base(ctx.completed_steps, ctx.total_steps, lambda_start,
                                 lambda_ratio)
    # The acceptance estimate runs first, without gradients, on the deterministic blocks.
    with torch.no_grad():
        estimate = _model_terms(model, head, batch, "eval_")
    terms = _model_terms(model, head, batch, "")
    denom = norm.sum().clamp(min=torch.finfo(torch.float32).tiny)
    if domino:
        total = ((1.0 - lam) * terms["ce"] + lam * terms["ce_base"]) / denom
    else:
        total = terms["ce"] / denom
    sums = {
        "ce": terms["ce"].detach().reshape(1),
        "weight": batch["weight"].sum().double().reshape(1),
        "correct_pos": terms["correct_pos"],
        "count_pos": terms["count_pos"],
        "accept_sum": estimate["accept_sum"].reshape(1),
        "accept_blocks": estimate["accept_blocks"].reshape(1),
        "label_counts": terms["label_counts"],
    }
    if domino:
        sums.update(
            ce_base=terms["ce_base"].detach().reshape(1),
            base_correct_pos=terms["base_correct_pos"],
            base_accept_sum=estimate["base_accept_sum"].reshape(1),
            lambda_sum=torch.tensor([lam], dtype=torch.float64, device=denom.device),
            micro_batches=torch.ones(1, dtype=torch.float64, device=denom.device),
        )
    return LossOutput(loss=total, sums=sums)


def summarise(sums: Mapping[str, torch.Tensor], *, first_position: int,
              domino: bool = False) -> dict[str, float]:
    """Reported metrics from step-wide sums: ``loss``, ``accuracy``, ``acc_{k}`` for each
    supervised block position, ``acceptance_length``, ``counted``; Domino adds ``final_loss``,
    ``base_loss``, ``base_accuracy``, ``accept_len``, ``base_accept_len``, ``lambda_base``."""
    weight = float(sums["weight"].sum().clamp(min=torch.finfo(torch.float32).tiny))
    count_pos = sums["count_pos"].double()
    counted = float(count_pos.sum())
    final_loss = float(sums["ce"].sum()) / weight
    blocks = max(float(sums["accept_blocks"].sum()), 1.0)
    out: dict[str, float] = {
        "loss": final_loss,
        "accuracy": float(sums["correct_pos"].sum()) / max(counted, 1.0),
        "acceptance_length": float(sums["accept_sum"].sum()) / blocks,
        "counted": counted,
    }
    per_pos = sums["correct_pos"].double() / count_pos.clamp(min=1)
    for k in range(first_position, per_pos.numel()):
        out[f"acc_{k}"] = float(per_pos[k])
    if domino:
        lam = float(sums["lambda_sum"].sum()) / max(float(sums["micro_batches"].sum()), 1.0)
        base_loss = float(sums["ce_base"].sum()) / weight
        out.update(
            loss=(1.0 - lam) * final_loss + lam * base_loss,
            final_loss=final_loss,
            base_loss=base_loss,
            base_accuracy=float(sums["base_correct_pos"].sum()) / max(counted, 1.0),
            accept_len=out["acceptance_length"],
            base_accept_len=float(sums["base_accept_sum"].sum()) / blocks,
            lambda_base=lam,
        )
    return out
