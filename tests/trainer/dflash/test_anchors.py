"""Anchor sampling, deterministic anchors, labels and weights."""

from __future__ import annotations

import math

import pytest
import torch

from tests.trainer.dflash.tiny import sample
from trainer.strategies.dflash.anchors import (
    block_targets,
    prepare,
    sample_anchors,
    strided_anchors,
)
from trainer.strategies.dflash.collate import collate


def _row(batch: dict, key: str, row: int) -> list[int]:
    return batch[key][row][batch["keep"][row]].tolist()


def test_anchors_are_supervised_pairs_and_depend_only_on_the_row_seed() -> None:
    a, b = sample(30, 1, supervised_from=5), sample(17, 2, supervised_from=3)
    a["loss_mask"][12] = 0  # 11 and 12 can no longer anchor
    alone = prepare(collate([a]), torch.tensor([77]), block_size=4, num_anchors=8, gamma=0.0,
                    shift_label=False)
    both = prepare(collate([b, a]), torch.tensor([5, 77]), block_size=4, num_anchors=8,
                   gamma=0.0, shift_label=False)
    mask = a["loss_mask"]
    anchors = _row(alone, "anchors", 0)
    assert anchors == sorted(anchors) and len(anchors) == 8
    assert all(mask[p] == 1 and mask[p + 1] == 1 for p in anchors)
    assert _row(both, "anchors", 1) == anchors  # companions and padding change nothing
    other = prepare(collate([a]), torch.tensor([78]), block_size=4, num_anchors=8, gamma=0.0,
                    shift_label=False)
    assert _row(other, "anchors", 0) != anchors


def test_rows_with_few_candidates_keep_them_all_and_pad_with_dropped_slots() -> None:
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0.0], [1, 1, 1, 1, 1, 1, 1, 1]])
    anchors, keep = sample_anchors(mask, torch.tensor([1, 2]), num_anchors=5)
    assert anchors[0][keep[0]].tolist() == [1, 4, 5]
    assert keep.sum(1).tolist() == [3, 5] and anchors[0][~keep[0]].tolist() == [0, 0]


def test_no_adjacent_supervised_pair_is_refused() -> None:
    mask = torch.tensor([[1, 0, 1, 0, 1.0], [0, 0, 0, 0, 1]])
    with pytest.raises(ValueError, match="requires two consecutive supervised tokens"):
        sample_anchors(mask, torch.tensor([1, 2]), 4)


def test_deterministic_anchors_are_every_candidate_evenly_strided() -> None:
    mask = torch.ones(1, 11)
    anchors, keep = strided_anchors(mask, num_anchors=20)
    assert anchors[0].tolist() == list(range(10)) and keep.all()
    anchors, _ = strided_anchors(mask, num_anchors=4)
    assert anchors[0].tolist() == [0, 2, 5, 7]


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("gamma", [0.0, 3.0])
def test_labels_and_weights_match_a_loop(shift: bool, gamma: float) -> None:
    ids = torch.arange(100, 109).view(1, 9)
    mask = torch.tensor([[0, 1, 1, 1, 0, 1, 1, 1, 0.0]])
    anchors = torch.tensor([[1, 5, 7, 0]])
    keep = torch.tensor([[True, True, True, False]])
    bs = 4
    got = block_targets(ids, mask, anchors, keep, bs, gamma, shift)
    for n, a in enumerate(anchors[0].tolist()):
        for k in range(bs):
            at = a + k + int(shift)
            inside = at < 9
            sup = bool(keep[0, n]) and inside and mask[0, at] == 1 and (shift or k > 0)
            d = 1.0 if gamma == 0 else math.exp(-(k if shift else max(k - 1, 0)) / gamma)
            assert got["labels"][0, n, k] == (ids[0, at] if inside else 0)
            assert got["block_ids"][0, n, k] == (ids[0, a + k] if a + k < 9 else 0)
            assert bool(got["supervised"][0, n, k]) == sup
            assert got["weight"][0, n, k].item() == pytest.approx(d if sup else 0.0)
