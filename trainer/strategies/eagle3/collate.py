"""Pad and stack EAGLE3 samples into a micro-batch (right padding; ``valid`` marks real tokens)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainer.strategies.base import Batch, Features

FEATURES = ("input_ids", "loss_mask", "aux_hidden_state", "hidden_state")


def _check(i: int, sample: Features) -> int:
    missing = [n for n in FEATURES if n not in sample]
    if missing:
        raise ValueError(f"sample {i}: missing features {missing}; EAGLE3 needs {list(FEATURES)}")
    length = sample["input_ids"].shape[0]
    aux, hid = sample["aux_hidden_state"], sample["hidden_state"]
    if sample["input_ids"].dim() != 1 or sample["loss_mask"].shape != (length,):
        raise ValueError(f"sample {i}: input_ids and loss_mask must both be [L] with the same L")
    if aux.dim() != 2 or hid.dim() != 2 or aux.shape[0] != length or hid.shape[0] != length:
        raise ValueError(
            f"sample {i}: aux_hidden_state {tuple(aux.shape)} and hidden_state "
            f"{tuple(hid.shape)} must be [L, 3H] and [L, H] with L={length}"
        )
    if aux.shape[1] != 3 * hid.shape[1]:
        raise ValueError(f"sample {i}: aux_hidden_state width {aux.shape[1]} != 3 x {hid.shape[1]}")
    if length < 2:
        raise ValueError(f"sample {i}: {length} token(s); EAGLE3 needs at least 2")
    return length


def collate(samples: Sequence[Features]) -> Batch:
    """Stack ``samples`` into ``input_ids`` [B,T], ``loss_mask`` [B,T] float, ``valid`` [B,T],
    ``aux_hidden_state`` [B,T,3H], ``hidden_state`` [B,T,H]; padding is zero / false."""
    if not samples:
        raise ValueError("empty micro-batch")
    lengths = [_check(i, s) for i, s in enumerate(samples)]
    b, t = len(samples), max(lengths)
    first = samples[0]
    out: Batch = {
        "input_ids": torch.zeros(b, t, dtype=torch.int64),
        "loss_mask": torch.zeros(b, t, dtype=torch.float32),
        "valid": torch.zeros(b, t, dtype=torch.bool),
        "aux_hidden_state": first["aux_hidden_state"].new_zeros(
            b, t, first["aux_hidden_state"].shape[1]
        ),
        "hidden_state": first["hidden_state"].new_zeros(b, t, first["hidden_state"].shape[1]),
    }
    for i, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        out["input_ids"][i, :n] = s["input_ids"]
        out["loss_mask"][i, :n] = s["loss_mask"].float()
        out["valid"][i, :n] = True
        out["aux_hidden_state"][i, :n] = s["aux_hidden_state"]
        out["hidden_state"][i, :n] = s["hidden_state"]
    return out
