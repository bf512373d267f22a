"""Export (names, config.json, reload, refusals) and option validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.trainer.dflash.tiny import LAYER_IDS, MASK_ID, build, sample, settings, target_head
from trainer.strategies import get_strategy
from trainer.strategies.base import StepContext
from trainer.strategies.dflash import validate_options
from trainer.strategies.dflash.export import load_export

LAYER_NAMES = [
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
]
HEAD_NAMES = ["prefix_gru.weight_ih_l0", "prefix_gru.weight_hh_l0", "embed_proj.0.weight",
              "embed_proj.2.weight"]


def _names(layers: int, domino: bool) -> set[str]:
    names = {f"layers.{i}.{n}" for i in range(layers) for n in LAYER_NAMES}
    names |= {"norm.weight", "fc.weight", "hidden_norm.weight"}
    return names | set(HEAD_NAMES) if domino else names


def _sums(spec, model, head):
    batch = spec.prepare(spec.collate([sample(13, 1, 2), sample(10, 2)]), torch.tensor([1, 2]))
    with torch.no_grad():
        return spec.loss(model, head, batch, spec.normaliser(batch), StepContext(1, 10)).sums


@pytest.mark.parametrize("algorithm", ["dflash", "domino"])
def test_export_writes_sglang_names_and_config_and_reloads(algorithm: str,
                                                          tmp_path: Path) -> None:
    head = target_head(dtype=torch.float32)
    opts = dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                sliding_window=5, loss_decay_gamma=7.0)
    spec, model = build(algorithm, head, dtype=torch.float32, **opts)
    names = spec.export(model, tmp_path, settings(head))
    domino = algorithm == "domino"
    assert set(names) == _names(2, domino)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(names)
        assert all(f.get_tensor(n).dtype == torch.bfloat16 for n in names)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and "auto_map" not in config
    assert config["model_type"] == "qwen3"
    assert (config["block_size"], config["num_target_layers"], config["num_hidden_layers"]) == (
        4, 4, 2)
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    assert config["sliding_window"] == 5
    assert (config["hidden_size"], config["head_dim"], config["vocab_size"]) == (32, 8, 96)
    assert config["rope_theta"] == 10000.0
    dflash = config["dflash_config"]
    assert dflash["target_layer_ids"] == LAYER_IDS and dflash["mask_token_id"] == MASK_ID
    if domino:
        assert dflash["projector_type"] == "domino" and dflash["pure_draft_prefix_len"] == 1
        assert dflash["shift_label"] is True
        assert (dflash["emb_dim"], dflash["gru_hidden_dim"]) == (12, 8)
    else:
        assert "projector_type" not in dflash

    # A fresh model from the export gives the same outputs as the trained one (in bf16).
    reloaded = load_export(tmp_path).float()
    assert reloaded.config == dataclasses.replace(model.config, rope=reloaded.config.rope)
    expect = model.to(torch.bfloat16).float()
    a, b = _sums(spec, expect, head), _sums(spec, reloaded, head)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6)


def test_export_without_sliding_layers_has_no_window(tmp_path: Path) -> None:
    head = target_head(dtype=torch.float32)
    spec, model = build("dflash", head, dtype=torch.float32)
    spec.export(model, tmp_path, settings(head, export_dtype=torch.float32))
    config = json.loads((tmp_path / "config.json").read_text())
    assert "sliding_window" not in config and config["layer_types"] == ["full_attention"]
    assert config["torch_dtype"] == "float32"


def test_export_refuses_unservable_domino_drafts(tmp_path: Path) -> None:
    head = target_head(dtype=torch.float32)
    spec, model = build("domino", head, dtype=torch.float32, pure_draft_prefix_len=0)
    with pytest.raises(ValueError, match="pure_draft_prefix_len=0: SGLang serves only 1"):
        spec.export(model, tmp_path, settings(head))
    spec, model = build("domino", head, dtype=torch.float32)
    with pytest.raises(ValueError, match="bfloat16 only"):
        spec.export(model, tmp_path, settings(head, export_dtype=torch.float16))
    del model.embed_proj  # a draft that lost part of its head
    with pytest.raises(ValueError, match=r"no \['embed_proj.0.weight', 'embed_proj.2.weight'\]"):
        spec.export(model, tmp_path, settings(head))
    assert not (tmp_path / "model.safetensors").exists()


def test_export_refuses_other_captured_layers(tmp_path: Path) -> None:
    head = target_head(dtype=torch.float32)
    spec, model = build("dflash", head, dtype=torch.float32)
    other = dataclasses.replace(settings(head), aux_layer_ids=[0, 2])
    with pytest.raises(ValueError, match=r"reads target layers \[1, 2\], the run captured"):
        spec.export(model, tmp_path, other)


@pytest.mark.parametrize(("algorithm", "options", "message"), [
    ("dflash", {}, "draft.dflash.mask_token_id is required"),
    ("dflash", {"mask_token_id": 1, "block_size": 1}, "draft.dflash.block_size=1: must be >= 2"),
    ("dflash", {"mask_token_id": 1, "num_hidden_layers": 2, "layer_types": ["full_attention"]},
     r"draft.dflash.layer_types=\['full_attention'\]: must list num_hidden_layers=2"),
    ("dflash", {"mask_token_id": 1, "layer_types": ["sliding_attention"]},
     "draft.dflash.sliding_window=0: must be > 0"),
    ("dflash", {"mask_token_id": 1, "layer_types": "full_attention"},
     "draft.dflash.layer_types='full_attention': must be a list"),
    ("dflash", {"mask_token_id": 1, "attention_backend": "flex"},
     "draft.dflash.attention_backend='flex'"),
    ("dflash", {"mask_token_id": 1, "emb_dim": 4}, r"draft.dflash: unknown option\(s\)"),
    ("dflash", {"mask_token_id": 1, "loss_decay_gamma": -1},
     "draft.dflash.loss_decay_gamma=-1"),
    ("domino", {"mask_token_id": 1, "gru_hidden_dim": 8}, "draft.domino.emb_dim is required"),
    ("domino", {"mask_token_id": 1, "emb_dim": 0, "gru_hidden_dim": 8},
     "draft.domino.emb_dim=0: must be an integer > 0"),
    ("domino", {"mask_token_id": 1, "emb_dim": 4, "gru_hidden_dim": 8, "shift_label": 1},
     "draft.domino.shift_label=1: must be true or false"),
    ("domino", {"mask_token_id": 1, "emb_dim": 4, "gru_hidden_dim": 8,
                "lambda_base_decay_ratio": 0}, "draft.domino.lambda_base_decay_ratio=0"),
])
def test_invalid_options_name_the_field(algorithm: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_strategy(algorithm, **options)
    with pytest.raises(ValueError, match=message):
        validate_options(algorithm, options, None)


def test_run_validation_adds_serving_and_target_rules() -> None:
    domino = {"mask_token_id": 1, "emb_dim": 4, "gru_hidden_dim": 8}
    validate_options("domino", domino, {"vocab_size": 96})
    get_strategy("domino", **domino, pure_draft_prefix_len=0)  # trainable, not servable
    with pytest.raises(ValueError, match=r"draft.domino.pure_draft_prefix_len=0: SGLang"):
        validate_options("domino", {**domino, "pure_draft_prefix_len": 0}, None)
    with pytest.raises(ValueError, match=r"draft.dflash.mask_token_id=96: must be < .* 96"):
        validate_options("dflash", {"mask_token_id": 96}, {"vocab_size": 96})
    with pytest.raises(ValueError, match="not DFlash-family"):
        validate_options("eagle3", {}, None)


def test_build_refuses_a_mask_token_outside_the_vocab() -> None:
    head = target_head()
    spec = get_strategy("dflash", mask_token_id=96)
    with pytest.raises(ValueError, match="mask_token_id=96: must be < the target's vocab_size"):
        spec.build_model(settings(head))
