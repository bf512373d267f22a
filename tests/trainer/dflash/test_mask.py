"""The block attention mask against a plain loop over (query, key) pairs."""

from __future__ import annotations

import pytest
import torch

from trainer.strategies.dflash.mask import block_mask


def reference(anchors: list[list[int]], keep: list[list[bool]], seq_len: int, bs: int,
              window: int) -> torch.Tensor:
    b, n = len(anchors), len(anchors[0])
    out = torch.zeros(b, 1, n * bs, seq_len + n * bs, dtype=torch.bool)
    for row in range(b):
        for q in range(n * bs):
            blk, off = divmod(q, bs)
            a = anchors[row][blk]
            if not keep[row][blk]:
                continue
            for kv in range(seq_len + n * bs):
                if kv < seq_len:
                    ok = kv < a and (window == 0 or kv >= a + off - (window - 1))
                else:
                    kv_blk, kv_off = divmod(kv - seq_len, bs)
                    ok = kv_blk == blk and (window == 0 or kv_off <= off)
                out[row, 0, q, kv] = ok
    return out


@pytest.mark.parametrize("window", [0, 1, 3, 6])
def test_mask_matches_the_loop_reference(window: int) -> None:
    anchors = [[0, 2, 3, 9], [5, 6, 0, 0]]
    keep = [[True, True, True, True], [True, True, False, False]]
    got = block_mask(torch.tensor(anchors), torch.tensor(keep), 12, 4, window)
    assert torch.equal(got, reference(anchors, keep, 12, 4, window))


def test_context_is_cut_at_the_anchor_not_the_block_index() -> None:
    # Overlapping blocks at anchors 4 and 5: the second must not see position 4's features
    # through the first's context, and neither sees its own anchor's target state.
    m = block_mask(torch.tensor([[4, 5]]), torch.ones(1, 2, dtype=torch.bool), 8, 3)
    assert m[0, 0, 0, :8].tolist() == [True] * 4 + [False] * 4
    assert m[0, 0, 3, :8].tolist() == [True] * 5 + [False] * 3
    assert not m[0, 0, :3, 8 + 3 :].any() and m[0, 0, :3, 8 : 8 + 3].all()
