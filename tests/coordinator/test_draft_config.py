"""DFlash and Domino run configs: refused at the YAML and again on the server, the field named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from coordinator import validate
from services.api import run_pb2
from services.capture import build_target_layer_ids, plan_for
from services.config import ConfigError, RunConfigFile, load_run_config, to_proto
from services.errors import InvalidArgument
from services.fingerprint import vocab_map_hash

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EMPTY_VOCAB = run_pb2.VocabMap(hash=vocab_map_hash([], []))


def _yaml(draft: dict, **top) -> dict:
    return {"run_id": "r", "dataset": "d.jsonl", "target": {"model_path": "m"}, "draft": draft,
            **top}


def _wire(draft: dict, total_steps: int = 10, layer_ids: list[int] | None = None,
          ) -> run_pb2.RunConfig:
    cfg = RunConfigFile.model_validate(_yaml(draft))
    wire = to_proto(cfg, num_layers=8, hidden_size=64, vocab_size=512, tokenizer_hash="t",
                    aux_layer_ids=layer_ids or [1, 5], mask_token_id=3)
    wire.training.total_steps = total_steps
    return wire


@pytest.mark.parametrize("name", ["tiny-dflash", "tiny-domino", "qwen3-8b-dflash",
                                  "qwen3-8b-domino"])
def test_examples_load(name: str) -> None:
    cfg = load_run_config(EXAMPLES / f"{name}.yaml")
    assert cfg.draft.algorithm == name.rsplit("-", 1)[1]
    assert cfg.draft.dflash is not None


@pytest.mark.parametrize(("draft", "top", "message"), [
    ({"algorithm": "dflash", "draft_vocab_size": 10}, {},
     "draft.draft_vocab_size applies to eagle3 only"),
    ({"algorithm": "domino"}, {}, "draft.domino is required for domino"),
    ({"algorithm": "dflash", "domino": {"emb_dim": 4, "gru_hidden_dim": 4}}, {},
     "draft.domino applies to domino only"),
    ({"algorithm": "eagle3", "dflash": {}}, {}, "draft.dflash applies to dflash and domino"),
    ({"algorithm": "dflash"}, {"capture": {"aux_layer_ids": [1, 2, 3]}},
     "capture.aux_layer_ids applies to eagle3 only"),
    ({"algorithm": "dflash", "dflash": {"block_size": 1}}, {}, "block_size"),
    ({"algorithm": "dflash", "dflash": {"num_hidden_layers": 2,
                                        "layer_types": ["full_attention"]}}, {},
     "layer_types lists 1 layers, num_hidden_layers is 2"),
    ({"algorithm": "dflash", "dflash": {"layer_types": ["sliding_attention"]}}, {},
     "sliding_window must be > 0"),
    ({"algorithm": "domino", "domino": {"emb_dim": 4, "gru_hidden_dim": 4,
                                        "pure_draft_prefix_len": 0}}, {},
     "pure_draft_prefix_len"),
    ({"algorithm": "medusa"}, {}, "draft.algorithm"),
    ({"algorithm": "dflash", "dflash": {"bogus": 1}}, {}, "bogus"),
])
def test_yaml_refuses_inconsistent_drafts(tmp_path: Path, draft: dict, top: dict,
                                          message: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_yaml(draft, **top)))
    with pytest.raises(ConfigError, match=message):
        load_run_config(path)


def test_wire_config_carries_the_draft() -> None:
    wire = _wire({"algorithm": "domino", "dflash": {"block_size": 8, "loss_decay_gamma": 5},
                  "domino": {"emb_dim": 16, "gru_hidden_dim": 32}})
    validate.run_config(wire, EMPTY_VOCAB)
    assert wire.draft.dflash.block_size == 8 and wire.draft.dflash.mask_token_id == 3
    assert list(wire.draft.dflash.layer_types) == ["full_attention"]
    assert (wire.draft.domino.emb_dim, wire.draft.domino.pure_draft_prefix_len) == (16, 1)
    assert wire.draft.draft_vocab_size == 0


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda c: setattr(c.training, "total_steps", 0),
     "config.training.total_steps: domino needs the run's step horizon"),
    (lambda c: setattr(c.draft.dflash, "mask_token_id", 512),
     r"mask_token_id: 512 is outside the target vocabulary \[0, 512\)"),
    (lambda c: setattr(c.draft.dflash, "loss_decay_gamma", float("nan")),
     "loss_decay_gamma: must be finite"),
    (lambda c: setattr(c.draft.dflash, "attention_backend", "flash"),
     "attention_backend: 'flash'"),
    (lambda c: setattr(c.draft.domino, "pure_draft_prefix_len", 0),
     "pure_draft_prefix_len: must be 1"),
    (lambda c: setattr(c.draft, "ttt_length", 3), "apply to eagle3 only"),
    (lambda c: c.draft.ClearField("domino"), "config.draft.domino: required for domino"),
    (lambda c: c.capture.aux_layer_ids.__setitem__(slice(None), [5, 1]), "must be ascending"),
    (lambda c: c.capture.aux_layer_ids.__setitem__(slice(None), [1, 7]), "out of range"),
])
def test_server_refuses_bad_domino_configs(mutate, message: str) -> None:
    wire = _wire({"algorithm": "domino", "domino": {"emb_dim": 16, "gru_hidden_dim": 32}})
    mutate(wire)
    with pytest.raises(InvalidArgument, match=message):
        validate.run_config(wire, EMPTY_VOCAB)


def test_server_refuses_a_vocabulary_map_for_dflash() -> None:
    wire = _wire({"algorithm": "dflash"})
    vocab = run_pb2.VocabMap(d2t=[0], draft_token_ids=[0], hash=vocab_map_hash([0], [0]))
    with pytest.raises(InvalidArgument, match="vocab_map: must be empty for dflash"):
        validate.run_config(wire, vocab)


@pytest.mark.parametrize(("n", "d", "ids"), [
    (36, 5, [1, 9, 17, 25, 33]), (64, 5, [1, 16, 31, 46, 61]), (32, 5, [1, 8, 15, 22, 29]),
    (4, 1, [2]), (8, 2, [1, 5]),
])
def test_default_target_layer_ids(n: int, d: int, ids: list[int]) -> None:
    assert build_target_layer_ids(n, d) == ids
    assert plan_for("dflash", ids, n).tensors == ("input_ids", "loss_mask", "hidden_states")


def test_yaml_refuses_more_epochs_than_a_run_may_have(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_yaml({"algorithm": "eagle3"}, epochs=99_999_999_999)))
    with pytest.raises(ConfigError, match="epochs: Input should be less than or equal to 1000"):
        load_run_config(path)


def test_a_dataset_line_that_is_not_utf8_is_refused_with_its_number(tmp_path: Path) -> None:
    from draftflow.run_cli import read_dataset_lines

    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(SystemExit, match=r"line 2 is not valid UTF-8 \(byte 0xff at column 8\)"):
        read_dataset_lines(data)
    data.write_bytes(b'{"a": 1}\r\n{"b": "\xc3\xa9"}\n')
    assert read_dataset_lines(data) == ['{"a": 1}', '{"b": "\u00e9"}']
