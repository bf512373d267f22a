"""Anchors (block starts) and each block's labels and loss weights.

A position ``p`` can anchor a block when it and ``p+1`` are both supervised: the block then has
at least one trained label. Training samples up to ``num_anchors`` anchors per row at random,
with a generator seeded from the row's own seed, so a row's anchors do not depend on its batch
companions, on padding or on the rank layout. The acceptance estimate uses deterministic
anchors: every candidate, evenly strided down to ``num_anchors``.

Labels (``bs`` = block size, ``a`` = anchor, ``shift`` = 1 with Domino's ``shift_label``):

* block position ``k`` predicts ``input_ids[a + k + shift]``;
* weight ``keep · [label inside the row] · loss_mask[label] · d_k``, and ``k = 0`` is never
  supervised without shift (it is the anchor itself);
* ``d_k = exp(-(k - 1 + shift)⁺ / gamma)``, or 1 when gamma is 0.
"""

from __future__ import annotations

import torch

from trainer.strategies.base import Batch

NO_PAIR = "DFlash-family training requires two consecutive supervised tokens"
_SEED_MASK = (1 << 64) - 1


def candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: position p and p+1 are both supervised (false at the last position)."""
    supervised = loss_mask > 0.5
    pair = supervised[:, :-1] & supervised[:, 1:]
    return torch.cat([pair, torch.zeros_like(supervised[:, :1])], dim=1)


def _pack(rows: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(int(r.numel()) for r in rows)
    if n == 0:
        raise ValueError(f"{NO_PAIR}; no row of this micro-batch has one")
    anchors = torch.zeros(len(rows), n, dtype=torch.int64)
    keep = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, r in enumerate(rows):
        anchors[i, : r.numel()] = r
        keep[i, : r.numel()] = True
    return anchors.to(device), keep.to(device)


def sample_anchors(loss_mask: torch.Tensor, row_seeds: torch.Tensor,
                   num_anchors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random anchors per row, ascending: ``anchors`` [B, N] int64 and ``keep`` [B, N] bool
    (false on the unused slots, whose anchor is 0); N = the most any row got."""
    valid = candidates(loss_mask).cpu()
    rows = []
    for b, seed in enumerate(row_seeds.tolist()):
        pos = valid[b].nonzero().squeeze(1)
        gen = torch.Generator().manual_seed(int(seed) & _SEED_MASK)
        pick = torch.randperm(pos.numel(), generator=gen)[: min(pos.numel(), num_anchors)]
        rows.append(pos[pick].sort().values)
    return _pack(rows, loss_mask.device)


def strided_anchors(loss_mask: torch.Tensor,
                    num_anchors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every candidate of each row, evenly strided down to ``num_anchors`` when there are more."""
    valid = candidates(loss_mask).cpu()
    rows = []
    for b in range(valid.shape[0]):
        pos = valid[b].nonzero().squeeze(1)
        if pos.numel() > num_anchors:
            pos = pos[torch.arange(num_anchors) * pos.numel() // num_anchors]
        rows.append(pos)
    return _pack(rows, loss_mask.device)


def decay(block_size: int, gamma: float, shift_label: bool) -> torch.Tensor:
    """[bs] position decay d_k (all ones when ``gamma`` is 0)."""
    k = torch.arange(block_size, dtype=torch.float64)
    if gamma <= 0:
        return torch.ones(block_size, dtype=torch.float32)
    steps = k if shift_label else (k - 1).clamp(min=0)
    return torch.exp(-steps / gamma).float()


def block_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor,
                  keep: torch.Tensor, block_size: int, gamma: float,
                  shift_label: bool = False) -> dict[str, torch.Tensor]:
    """Per block slot, [B, N, bs]: ``block_ids`` (tokens a..a+bs-1, 0 past the row),
    ``labels``, ``supervised`` (bool) and ``weight`` (supervised · decay, float32)."""
    seq_len = input_ids.shape[1]
    shift = 1 if shift_label else 0
    offsets = torch.arange(block_size, device=anchors.device)
    pos = anchors.unsqueeze(-1) + offsets

    def gather(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        inside = at < seq_len
        flat = at.clamp(max=seq_len - 1).flatten(1)
        return torch.gather(x, 1, flat).view(at.shape) * inside, inside

    block_ids, _ = gather(input_ids, pos)
    labels, inside = gather(input_ids, pos + shift)
    label_mask, _ = gather(loss_mask, pos + shift)
    supervised = inside & (label_mask > 0.5) & keep.unsqueeze(-1)
    if not shift_label:
        supervised[..., 0] = False
    d = decay(block_size, gamma, shift_label).to(loss_mask.device)
    return {"block_ids": block_ids, "labels": labels, "supervised": supervised,
            "weight": supervised.float() * d}


def prepare(batch: Batch, row_seeds: torch.Tensor, *, block_size: int, num_anchors: int,
            gamma: float, shift_label: bool) -> Batch:
    """Add the training blocks (``anchors``, ``keep``, ``block_ids``, ``labels``,
    ``supervised``, ``weight``) and the acceptance-estimate blocks (same names prefixed
    ``eval_``) to a collated micro-batch."""
    if row_seeds.shape != (batch["input_ids"].shape[0],):
        raise ValueError(f"row_seeds {tuple(row_seeds.shape)}: need one seed per row "
                         f"({batch['input_ids'].shape[0]})")
    out = dict(batch)
    ids, mask = batch["input_ids"], batch["loss_mask"]
    for prefix, (anchors, keep) in (
        ("", sample_anchors(mask, row_seeds, num_anchors)),
        ("eval_", strided_anchors(mask, num_anchors)),
    ):
        out[f"{prefix}anchors"], out[f"{prefix}keep"] = anchors, keep
        targets = block_targets(ids, mask, anchors, keep, block_size, gamma, shift_label)
        out.update({f"{prefix}{k}": v for k, v in targets.items()})
    return out


def normaliser(batch: Batch) -> torch.Tensor:
    """Σ weight over the micro-batch's training blocks, [1]; summed over the step it divides the
    loss, so the step's loss is a weighted mean over every supervised slot of every rank."""
    return batch["weight"].sum().reshape(1)

