"""Pad and stack DFlash-family samples into a micro-batch (right zero padding).

Padding needs no attention mask: padded positions have ``loss_mask`` 0, so they are never
anchors or labels, and they lie after every real token, so no anchor's context reaches them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trainer.strategies.base import Batch, Features

FEATURES = ("input_ids", "loss_mask", "hidden_states")


def _check(i: int, sample: Features) -> int:
    missing = [n for n in FEATURES if n not in sample]
    if missing:
        raise ValueError(f"sample {i}: missing features {missing}; DFlash needs {list(FEATURES)}")
    ids, mask, hidden = sample["input_ids"], sample["loss_mask"], sample["hidden_states"]
    length = ids.shape[0]
    if ids.dim() != 1 or mask.shape != (length,):
        raise ValueError(f"sample {i}: input_ids and loss_mask must both be [L] with the same L")
    if hidden.dim() != 2 or hidden.shape[0] != length:
        raise ValueError(
            f"sample {i}: hidden_states {tuple(hidden.shape)} must be [L, K·H] with L={length}")
    return length


def collate(samples: Sequence[Features]) -> Batch:
    """``input_ids`` [B,S] int64, ``loss_mask`` [B,S] float, ``hidden_states`` [B,S,K·H] (the
    features' dtype); zeros past each sample's end."""
    if not samples:
        raise ValueError("empty micro-batch")
    lengths = [_check(i, s) for i, s in enumerate(samples)]
    widths = {int(s["hidden_states"].shape[1]) for s in samples}
    if len(widths) != 1:
        raise ValueError(f"hidden_states widths differ across the micro-batch: {sorted(widths)}")
    b, t = len(samples), max(lengths)
    first = samples[0]["hidden_states"]
    out: Batch = {
        "input_ids": torch.zeros(b, t, dtype=torch.int64),
        "loss_mask": torch.zeros(b, t, dtype=torch.float32),
        "hidden_states": first.new_zeros(b, t, first.shape[1]),
    }
    for i, (s, n) in enumerate(zip(samples, lengths, strict=True)):
        out["input_ids"][i, :n] = s["input_ids"]
        out["loss_mask"][i, :n] = s["loss_mask"].float()
        out["hidden_states"][i, :n] = s["hidden_states"]
    return out
