"""The draft vocabulary map and the target facts run creation sends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from producer.dataprep import PreparedPrompt
from producer.vocab import (
    build_vocab_map,
    describe_run,
    run_config_proto,
    t2d_mask,
    token_frequencies,
)
from services.config import ConfigError, RunConfigFile
from services.fingerprint import vocab_map_hash
from services.tiny_model import DEFAULT_DATASET, build_tiny_target


def _cfg(model_dir: Path, **sections: dict) -> RunConfigFile:
    return RunConfigFile.model_validate({
        "run_id": "r1", "dataset": "conversations.jsonl",
        "target": {"model_path": str(model_dir), "revision": "tiny"},
        "draft": {"draft_vocab_size": 256}, **sections,
    })


def _lines() -> list[str]:
    return DEFAULT_DATASET.read_text().splitlines()


def test_ties_break_by_id_and_unused_ids_pad() -> None:
    counts = torch.tensor([0, 5, 5, 1, 0, 0, 3, 0])
    vm = build_vocab_map(counts, 5)
    # 1 and 2 (5 each), 6 (3), 3 (1), then the smallest unused id, 0.
    assert list(vm.draft_token_ids) == [0, 1, 2, 3, 6]
    assert list(vm.d2t) == [0, 0, 0, 0, 2]
    assert vm.hash == vocab_map_hash([0, 0, 0, 0, 2], [0, 1, 2, 3, 6])
    assert list(build_vocab_map(counts, 2).draft_token_ids) == [1, 2]
    assert list(build_vocab_map(torch.zeros(4, dtype=torch.int64), 3).draft_token_ids) == [0, 1, 2]


@pytest.mark.parametrize("size", [0, 9])
def test_draft_vocab_must_fit_the_target(size: int) -> None:
    with pytest.raises(ConfigError, match=r"must be in \[1, 8\], the target's vocabulary size"):
        build_vocab_map(torch.zeros(8, dtype=torch.int64), size)


def test_only_trained_positions_count() -> None:
    prompt = PreparedPrompt(input_ids=torch.tensor([7, 7, 7, 2, 3, 3]),
                            loss_mask=torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.uint8),
                            truncated=False)
    assert token_frequencies([prompt, prompt], 8).tolist() == [0, 0, 2, 4, 0, 0, 0, 0]
    with pytest.raises(ConfigError, match="outside the target vocabulary of 3"):
        token_frequencies([prompt], 3)


def test_t2d_mask_marks_the_draft_ids() -> None:
    vm = build_vocab_map(torch.tensor([0, 5, 5, 1, 0, 0, 3, 0]), 3)
    assert t2d_mask(vm, 8).tolist() == [False, True, True, False, False, False, True, False]


def test_describe_run_reads_the_target(llama_dir: Path) -> None:
    lines = [*_lines(), "{broken", json.dumps({"messages": [{"role": "user", "content": "q"}]})]
    facts = describe_run(llama_dir, _cfg(llama_dir), lines)
    assert (facts.num_layers, facts.hidden_size, facts.vocab_size) == (8, 128, 2048)
    assert facts.aux_layer_ids == [1, 3, 4]
    assert facts.num_prompts == len(lines) - 2
    assert facts.bad_rows == [
        (len(lines) - 1, "not valid JSON: Expecting property name enclosed in double quotes "
                         "at column 2"),
        (len(lines), "no assistant turn: nothing to train on"),
    ]
    vm = facts.vocab_map
    assert len(vm.draft_token_ids) == len(vm.d2t) == 256
    assert list(vm.draft_token_ids) == sorted(set(vm.draft_token_ids))
    assert all(d + i == t for i, (d, t) in enumerate(zip(vm.d2t, vm.draft_token_ids,
                                                          strict=True)))
    assert vm.hash == vocab_map_hash(list(vm.d2t), list(vm.draft_token_ids))
    proto = run_config_proto(_cfg(llama_dir), facts)
    assert proto.target.num_layers == 8 and proto.target.tokenizer_hash == facts.tokenizer_hash
    assert list(proto.capture.aux_layer_ids) == [1, 3, 4]


def test_same_inputs_give_the_same_map(llama_dir: Path, tmp_path: Path) -> None:
    first = describe_run(llama_dir, _cfg(llama_dir), _lines())
    # A second, independently built copy of the same target, as on another node.
    copy = build_tiny_target(tmp_path / "copy", arch="llama")
    second = describe_run(copy, _cfg(copy), _lines())
    assert second.vocab_map.SerializeToString() == first.vocab_map.SerializeToString()
    assert second.tokenizer_hash == first.tokenizer_hash


def test_the_map_follows_the_data(llama_dir: Path) -> None:
    full = describe_run(llama_dir, _cfg(llama_dir), _lines())
    half = describe_run(llama_dir, _cfg(llama_dir), _lines()[:50])
    assert half.vocab_map.hash != full.vocab_map.hash


def test_capture_settings_are_validated(llama_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[7\] out of range"):
        describe_run(llama_dir, _cfg(llama_dir, capture={"aux_layer_ids": [1, 2, 7]}), _lines())
    with pytest.raises(ConfigError, match="no dataset row can be trained on"):
        describe_run(llama_dir, _cfg(llama_dir, capture={"max_length": 4}), _lines())
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        describe_run(llama_dir / "missing", _cfg(llama_dir), _lines())
    custom = describe_run(llama_dir, _cfg(llama_dir, capture={"aux_layer_ids": [0, 2, 6]}),
                          _lines()[:10])
    assert custom.aux_layer_ids == [0, 2, 6]
