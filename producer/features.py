"""The EAGLE3 sample a producer writes: four named tensors, unshifted (the trainer shifts).

``input_ids`` int64 [L], ``loss_mask`` uint8 [L] (0/1), ``aux_hidden_state`` [L, 3H] and
``hidden_state`` [L, H] in the model's dtype.
"""

from __future__ import annotations

import torch

from producer.dataprep import LOSS_MASK_DTYPE, PreparedPrompt
from producer.engines.base import CapturedFeatures, EngineError

EAGLE3_TENSORS = ("input_ids", "loss_mask", "aux_hidden_state", "hidden_state")


def eagle3_features(prompt: PreparedPrompt, captured: CapturedFeatures) -> dict[str, torch.Tensor]:
    """Pair a prepared prompt with its captured hidden states, checking they belong together."""
    n = prompt.num_tokens
    if captured.num_tokens != n or captured.aux_hidden_state.shape[0] != n:
        raise EngineError(
            f"captured {captured.num_tokens} positions for a prompt of {n} tokens; the engine "
            "must return one hidden state per prompt token"
        )
    return {
        "input_ids": prompt.input_ids.to(torch.int64).contiguous(),
        "loss_mask": prompt.loss_mask.to(LOSS_MASK_DTYPE).contiguous(),
        "aux_hidden_state": captured.aux_hidden_state.contiguous(),
        "hidden_state": captured.hidden_state.contiguous(),
    }
