"""Write an EAGLE3 draft as a directory SGLang serves with ``--speculative-algorithm EAGLE3``.

Weight names and config keys follow SGLang's ``python/sglang/srt/models/llama_eagle3.py``
(``LlamaForCausalLMEagle3.load_weights``); docs/export.md lists each name and its origin.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer.strategies.eagle3.model import Eagle3Draft

LAYER_WEIGHTS = (
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
)
EXPORTED_NAMES: tuple[str, ...] = (
    "fc.weight", *LAYER_WEIGHTS, "norm.weight", "lm_head.weight", "d2t", "t2d",
)
"""Every tensor in the exported ``model.safetensors``; documented in docs/export.md."""


def export_config(draft: Eagle3Draft, aux_layer_ids: Sequence[int], dtype: torch.dtype) -> dict:
    """``config.json`` of the export: a one-layer Llama plus the EAGLE3 keys SGLang reads."""
    cfg = draft.config
    config = cfg.llama_config().to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"):
        config.pop(key, None)
    config.update(
        architectures=["LlamaForCausalLMEagle3"],
        model_type="llama",
        num_hidden_layers=1,
        tie_word_embeddings=False,
        vocab_size=cfg.vocab_size,
        draft_vocab_size=cfg.draft_vocab_size,
        target_hidden_size=cfg.target_hidden_size,
        torch_dtype=str(dtype).removeprefix("torch."),
        # SGLang captures the *input* of layer id+1, i.e. the output of layer id: the same
        # layers the producer captured for training.
        eagle_config={
            "eagle_aux_hidden_state_layer_ids": [int(i) for i in aux_layer_ids],
            "use_aux_hidden_state": True,
        },
    )
    return config


def export_tensors(draft: Eagle3Draft, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The exported tensors by name; floats cast to ``dtype``, ``d2t`` int64, ``t2d`` bool."""
    state = {k: v.detach().cpu() for k, v in draft.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for name in EXPORTED_NAMES:
        tensor = state[name]
        out[name] = tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor
    return out


def write_export(
    draft: Eagle3Draft, out_dir: Path, aux_layer_ids: Sequence[int],
    dtype: torch.dtype = torch.bfloat16,
) -> list[str]:
    """Write ``config.json`` and ``model.safetensors`` into ``out_dir`` (which must exist)."""
    tensors = export_tensors(draft, dtype)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = export_config(draft, aux_layer_ids, dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return list(tensors)
