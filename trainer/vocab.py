"""The draft vocabulary as tensors: ``d2t`` (draft id -> target id offset) and ``t2d`` (mask).

SGLang's convention: ``target_id = draft_id + d2t[draft_id]``; ``t2d[target_id]`` is true when
the target token is in the draft vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from services.api import run_pb2


def vocab_tensors(
    draft_token_ids: Sequence[int], target_vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(d2t int64 [Vd], t2d bool [V])`` for ascending, distinct target ids."""
    ids = torch.tensor(list(draft_token_ids), dtype=torch.int64)
    if ids.numel() == 0:
        raise ValueError("draft vocabulary is empty; draft_vocab_size must be > 0")
    if bool((ids[1:] <= ids[:-1]).any()):
        raise ValueError("draft_token_ids must be strictly ascending")
    if int(ids[0]) < 0 or int(ids[-1]) >= target_vocab_size:
        raise ValueError(f"draft_token_ids must lie in [0, {target_vocab_size})")
    d2t = ids - torch.arange(ids.numel(), dtype=torch.int64)
    t2d = torch.zeros(target_vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return d2t, t2d


def from_proto(
    vocab: run_pb2.VocabMap, target_vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensors for a run's stored ``VocabMap``."""
    return vocab_tensors(list(vocab.draft_token_ids), target_vocab_size)


def most_frequent(
    token_ids: Iterable[torch.Tensor], masks: Iterable[torch.Tensor], draft_vocab_size: int,
    target_vocab_size: int,
) -> list[int]:
    """The ``draft_vocab_size`` most frequent loss-masked tokens (ties: lower id), ascending.

    Tokens never seen fill the remainder in id order, so the size is always exact.
    """
    counts = torch.zeros(target_vocab_size, dtype=torch.int64)
    for ids, mask in zip(token_ids, masks, strict=True):
        counts += torch.bincount(ids[mask.bool()], minlength=target_vocab_size)
    # Stable sort on -count keeps lower ids first among equal counts.
    order = torch.sort(-counts, stable=True).indices[:draft_vocab_size]
    return sorted(int(i) for i in order)
