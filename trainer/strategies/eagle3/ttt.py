"""EAGLE3 loss and metrics over the unrolled training-time test.

Shifting (features arrive unshifted, all of length L):

* draft position j (0 ≤ j ≤ L-2) starts from ``aux_hidden_state[j]``, the target's state after
  reading tokens 0..j;
* at unroll step k it embeds ``input_ids[j+1+k]`` and predicts the token at j+2+k;
* its teacher is the target's next-token distribution at position p = j+1+k:
  ``softmax(lm_head(hidden_state[p])[draft columns])``;
* it counts when that predicted token is a trained token: ``loss_mask[p+1] = 1`` with p+1 < L.
  Positions whose target top-1 token lies outside the draft vocabulary count as misses and get
  no gradient (the draft cannot emit them).

The loss of step k is the cross-entropy against the teacher summed over counted positions and
divided by the number of counted positions of the whole optimizer step (all micro-batches, all
ranks); steps are weighted ``decay**k``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from trainer.strategies.base import Batch, LossOutput, StepContext
from trainer.target_head import TargetHead

TEACHER_CHUNK = 256
"""Positions per chunk when applying the full-vocabulary target head (bounds memory)."""


def _shift(x: torch.Tensor, by: int, length: int) -> torch.Tensor:
    """``x[:, by:by+length]`` along dim 1, zero-padded past the end."""
    pad = [0, 0] * (x.dim() - 2) + [0, by + length]
    return F.pad(x, pad)[:, by : by + length]


def counted(batch: Batch) -> torch.Tensor:
    """[B, T] float: 1 where the target's prediction at p targets a trained token (p+1 < L)."""
    nxt = batch["loss_mask"][:, 1:] * batch["valid"][:, 1:].float()
    return F.pad(nxt, (0, 1))


def normaliser(batch: Batch, ttt_length: int) -> torch.Tensor:
    """Counted positions per unroll step, [K]; summed over the step it divides the loss."""
    c = counted(batch)
    s = c.shape[1] - 1
    return torch.stack([_shift(c, 1 + k, s).sum() for k in range(ttt_length)])


@torch.no_grad()
def teacher(head: TargetHead, batch: Batch, draft_ids: torch.Tensor, t2d: torch.Tensor) -> tuple[
    torch.Tensor, torch.Tensor
]:
    """Teacher probabilities over the draft vocabulary [B,T,Vd] and an in-vocab mask [B,T]."""
    hidden = batch["hidden_state"]
    b, t, h = hidden.shape
    flat = hidden.reshape(b * t, h)
    probs, in_vocab = [], []
    for start in range(0, b * t, TEACHER_CHUNK):
        logits = flat[start : start + TEACHER_CHUNK].float() @ head.lm_head.float().T
        in_vocab.append(t2d[logits.argmax(-1)])
        probs.append(logits[:, draft_ids].softmax(-1))
    return torch.cat(probs).view(b, t, -1), torch.cat(in_vocab).view(b, t)


def loss(
    model: torch.nn.Module, head: TargetHead, batch: Batch, norm: torch.Tensor,
    ctx: StepContext | None = None, *, ttt_length: int, decay: float,
) -> LossOutput:
    """Forward the draft over ``batch`` and return the step-normalised loss and metric sums."""
    inner = getattr(model, "module", model)
    logits = model(batch["input_ids"], batch["aux_hidden_state"], batch["valid"], ttt_length)
    probs, in_vocab = teacher(head, batch, inner.draft_ids, inner.t2d)
    labels = probs.argmax(-1)
    count_base = counted(batch)
    s = batch["input_ids"].shape[1] - 1
    total = logits[0].new_zeros((), dtype=torch.float32)
    ce_sums, correct_sums, counts, run, alive = [], [], [], None, None
    for k, lg in enumerate(logits):
        count_k = _shift(count_base, 1 + k, s)
        weight_k = count_k * _shift(in_vocab.float(), 1 + k, s)
        ce = -(_shift(probs, 1 + k, s) * lg.float().log_softmax(-1)).sum(-1)
        ce_sum = (ce * weight_k).sum()
        total = total + (decay**k) * ce_sum / norm[k].clamp(min=1)
        with torch.no_grad():
            hit = (lg.argmax(-1) == _shift(labels, 1 + k, s)) & (weight_k > 0)
            # Simulated acceptance: drafts from start j are accepted while every step hits.
            if k == 0:
                starts = count_k > 0
                alive = hit.clone()
                run = hit.float()
                # How often each token is the target: the baseline of always guessing one.
                label_counts = torch.bincount(_shift(labels, 1, s)[weight_k > 0],
                                              minlength=probs.shape[-1]).float()
            else:
                alive = alive & hit
                run = run + alive.float()
        ce_sums.append(ce_sum.detach())
        correct_sums.append(hit.sum().float())
        counts.append(count_k.sum())
    sums = {
        "ce": torch.stack(ce_sums),
        "correct": torch.stack(correct_sums),
        "count": torch.stack(counts),
        "accept_run": (run * starts.float()).sum().unsqueeze(0),
        "accept_starts": starts.float().sum().unsqueeze(0),
        "label_counts": label_counts,
    }
    return LossOutput(loss=total, sums=sums)


def summarise(sums: Mapping[str, torch.Tensor], decay: float) -> dict[str, float]:
    """Per-step accuracy and loss, total loss and simulated acceptance length from step sums."""
    count = sums["count"].clamp(min=1)
    losses = (sums["ce"] / count).tolist()
    out: dict[str, float] = {
        "loss": float(sum((decay**k) * v for k, v in enumerate(losses))),
        "acceptance_length": 1.0
        + float(sums["accept_run"].sum() / sums["accept_starts"].sum().clamp(min=1)),
        "counted": float(sums["count"][0]),
    }
    for k, (acc, lk) in enumerate(zip((sums["correct"] / count).tolist(), losses, strict=True)):
        out[f"acc_{k}"] = acc
        out[f"loss_{k}"] = lk
    return out
