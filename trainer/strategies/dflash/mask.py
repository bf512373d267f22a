"""The DFlash attention mask over ``[context (S) | block_0 (bs) | ... | block_{N-1} (bs)]``.

Queries are the N·bs block slots. Query slot ``o`` of block ``n`` (anchor ``a``) may see:

* context position ``j`` iff ``j < a``: target features strictly before the anchor, which is what
  the draft has at serving time (visibility by anchor position, so overlapping blocks never see
  a later block's target states);
* every slot of its own block (bidirectional), no other block.

On a sliding layer of window ``W`` (counting the current slot, as SGLang's ``window_left =
W - 1``) the context is further cut to ``j >= a + o - (W - 1)`` and the block becomes causal.
Blocks with ``keep = False`` see nothing; attention returns zeros for them.
"""

from __future__ import annotations

import torch


def block_mask(anchors: torch.Tensor, keep: torch.Tensor, seq_len: int, block_size: int,
               sliding_window: int = 0) -> torch.Tensor:
    """Allowed (query, key) pairs, bool ``[B, 1, N·bs, S + N·bs]``; ``sliding_window`` 0 = full."""
    b, n = anchors.shape
    device = anchors.device
    offset = torch.arange(block_size, device=device)
    # Per query slot: its anchor [B, Q] and its offset in the block [Q].
    anchor_q = anchors.repeat_interleave(block_size, dim=1)
    offset_q = offset.repeat(n)
    ctx_pos = torch.arange(seq_len, device=device)
    ctx = ctx_pos.view(1, 1, -1) < anchor_q.unsqueeze(-1)
    block_q = torch.arange(n, device=device).repeat_interleave(block_size)
    draft = (block_q.view(-1, 1) == block_q.view(1, -1)).unsqueeze(0)
    if sliding_window > 0:
        lowest = anchor_q + offset_q.view(1, -1) - (sliding_window - 1)
        ctx = ctx & (ctx_pos.view(1, 1, -1) >= lowest.unsqueeze(-1))
        draft = draft & (offset_q.view(1, -1) <= offset_q.view(-1, 1)).unsqueeze(0)
    allowed = torch.cat([ctx, draft.expand(b, -1, -1)], dim=-1)
    keep_q = keep.repeat_interleave(block_size, dim=1)
    return (allowed & keep_q.unsqueeze(-1)).unsqueeze(1)
