"""The sample a producer writes: named tensors, unshifted (the trainer shifts), per the plan.

``input_ids`` int64 [L], ``loss_mask`` uint8 [L] (0/1), the plan's concatenated layers
(``aux_hidden_state`` for EAGLE3, ``hidden_states`` for DFlash and Domino) [L, K·H] and, when
the plan captures it, ``hidden_state`` [L, H], in the model's dtype.
"""

from __future__ import annotations

import torch

from producer.dataprep import LOSS_MASK_DTYPE, PreparedPrompt
from producer.engines.base import CapturedFeatures, EngineError
from services.capture import FINAL_HIDDEN_TENSOR, CapturePlan


def sample_features(prompt: PreparedPrompt, captured: CapturedFeatures,
                    plan: CapturePlan) -> dict[str, torch.Tensor]:
    """Pair a prepared prompt with its captured hidden states, checking they belong together."""
    n = prompt.num_tokens
    if captured.num_tokens != n:
        raise EngineError(
            f"captured {captured.num_tokens} positions for a prompt of {n} tokens; the engine "
            "must return one hidden state per prompt token"
        )
    features = {
        "input_ids": prompt.input_ids.to(torch.int64).contiguous(),
        "loss_mask": prompt.loss_mask.to(LOSS_MASK_DTYPE).contiguous(),
        plan.layers_tensor: captured.aux_hidden_state.contiguous(),
    }
    if plan.final_hidden:
        if captured.hidden_state is None:
            raise EngineError("the capture plan needs the final hidden state; the engine "
                              "returned none")
        features[FINAL_HIDDEN_TENSOR] = captured.hidden_state.contiguous()
    return features
