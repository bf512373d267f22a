"""The target head reads only the embedding and lm_head, from single or sharded safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from trainer.target_head import TargetHeadError, load_target_head


def _write(dir_: Path, tensors: dict[str, torch.Tensor], tied: bool, shards: int = 1) -> None:
    dir_.mkdir()
    (dir_ / "config.json").write_text(json.dumps(
        {"hidden_size": 4, "vocab_size": 6, "tie_word_embeddings": tied}))
    if shards == 1:
        save_file(tensors, str(dir_ / "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(dir_ / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (dir_ / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(6, 4, generator=g),
        "lm_head.weight": torch.randn(6, 4, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g),
    }


def test_single_file(tmp_path: Path) -> None:
    t = _tensors()
    _write(tmp_path / "m", t, tied=False)
    head = load_target_head(tmp_path / "m")
    assert torch.equal(head.embed, t["model.embed_tokens.weight"])
    assert torch.equal(head.lm_head, t["lm_head.weight"])
    assert (head.vocab_size, head.hidden_size) == (6, 4)


def test_sharded_index(tmp_path: Path) -> None:
    t = _tensors()
    _write(tmp_path / "m", t, tied=False, shards=3)
    head = load_target_head(tmp_path / "m", dtype=torch.bfloat16)
    assert head.lm_head.dtype == torch.bfloat16
    assert torch.equal(head.lm_head, t["lm_head.weight"].to(torch.bfloat16))


def test_tied_embeddings_reuse_the_embedding(tmp_path: Path) -> None:
    t = _tensors()
    del t["lm_head.weight"]
    _write(tmp_path / "m", t, tied=True)
    head = load_target_head(tmp_path / "m")
    assert torch.equal(head.lm_head, t["model.embed_tokens.weight"])


def test_missing_head_untied_is_refused(tmp_path: Path) -> None:
    t = _tensors()
    del t["lm_head.weight"]
    _write(tmp_path / "m", t, tied=False)
    with pytest.raises(TargetHeadError, match=r"no lm_head\.weight and tie_word_embeddings"):
        load_target_head(tmp_path / "m")


def test_no_safetensors_says_how_to_fix(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(TargetHeadError, match="convert the target to safetensors"):
        load_target_head(tmp_path / "m")
