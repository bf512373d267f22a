"""Write a DFlash/Domino draft as a directory SGLang serves with ``--speculative-algorithm
DFLASH``: ``model.safetensors`` named as SGLang's DFlash loader reads it and ``config.json``
(Qwen3 fields, ``architectures: ["DFlashDraftModel"]`` for Domino too, no ``auto_map``, and the
resolved ``dflash_config``: the captured layer ids and the mask token training used).

SGLang ignores unknown weight names and needs every Domino head weight, so the export writes
exactly the expected set and refuses a draft that lacks any of it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from trainer.strategies.dflash.config import SERVING_PURE_DRAFT_PREFIX_LEN, DFlashConfig
from trainer.strategies.dflash.model import DFlashDraft, DominoDraft

_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
DOMINO_HEAD = ("prefix_gru.weight_ih_l0", "prefix_gru.weight_hh_l0", "embed_proj.0.weight",
               "embed_proj.2.weight")


def expected_names(cfg: DFlashConfig) -> list[str]:
    """Every tensor name of the export of a draft with config ``cfg``."""
    names = []
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        for proj in _PROJ:
            names.append(f"{p}self_attn.{proj}.weight")
            if cfg.attention_bias:
                names.append(f"{p}self_attn.{proj}.bias")
        names += [f"{p}self_attn.q_norm.weight", f"{p}self_attn.k_norm.weight",
                  f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight",
                  f"{p}mlp.down_proj.weight", f"{p}input_layernorm.weight",
                  f"{p}post_attention_layernorm.weight"]
    names += ["norm.weight", "fc.weight", "hidden_norm.weight"]
    if cfg.is_domino:
        names += list(DOMINO_HEAD)
    return names


def check_servable(cfg: DFlashConfig, dtype: torch.dtype) -> None:
    """Refuse what SGLang 0.5.23 would reject or serve wrongly; the message says what."""
    if cfg.block_size < 2:
        raise ValueError(f"block_size={cfg.block_size}: SGLang's DFlash needs >= 2")
    if not cfg.is_domino:
        return
    if cfg.pure_draft_prefix_len != SERVING_PURE_DRAFT_PREFIX_LEN:
        raise ValueError(
            f"Domino pure_draft_prefix_len={cfg.pure_draft_prefix_len}: SGLang serves only "
            f"{SERVING_PURE_DRAFT_PREFIX_LEN}; retrain with draft.domino.pure_draft_prefix_len=1")
    if not isinstance(cfg.shift_label, bool):
        raise ValueError(f"Domino shift_label={cfg.shift_label!r}: must be a bool")
    if cfg.emb_dim <= 0 or cfg.gru_hidden_dim <= 0:
        raise ValueError(f"Domino emb_dim={cfg.emb_dim}, gru_hidden_dim={cfg.gru_hidden_dim}: "
                         "both must be > 0")
    if dtype != torch.bfloat16:
        raise ValueError(f"Domino export dtype {dtype}: SGLang serves Domino in bfloat16 only")


def export_tensors(draft: DFlashDraft, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The exported tensors by name, cast to ``dtype``; raises if the draft lacks any."""
    cfg = draft.config
    state = {k: v.detach().cpu() for k, v in draft.state_dict().items()}
    names = expected_names(cfg)
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"the draft has no {missing}: a {cfg.projector_type} export needs "
                         "every one (SGLang would refuse or serve random weights)")
    unexpected = sorted(set(state) - set(names))
    if unexpected:
        raise ValueError(f"the draft has weights {unexpected} that a {cfg.projector_type} "
                         "export does not define (SGLang would ignore or reject them)")
    return {n: state[n].to(dtype).contiguous() for n in names}


def write_export(draft: DFlashDraft, out_dir: Path,
                 dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Write ``config.json`` and ``model.safetensors`` into ``out_dir`` (which must exist)."""
    check_servable(draft.config, dtype)
    tensors = export_tensors(draft, dtype)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = draft.config.to_hf_dict()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return list(tensors)


def load_export(out_dir: Path, **runtime: object) -> DFlashDraft:
    """Rebuild a draft from an export directory (``runtime``: training-time config fields such
    as ``attention_backend``)."""
    cfg = DFlashConfig.from_hf_dict(json.loads((out_dir / "config.json").read_text()))
    cfg = replace(cfg, **runtime)
    draft = DominoDraft(cfg) if cfg.is_domino else DFlashDraft(cfg)
    draft.load_state_dict(load_file(str(out_dir / "model.safetensors")), strict=True)
    return draft
