"""The run config's ``regenerate`` section: validation, the wire form and the fingerprint."""

from __future__ import annotations

from typing import Any

import pytest

from services.config import RunConfigFile, to_proto
from services.fingerprint import run_fingerprint


def _config(**extra: Any) -> RunConfigFile:
    return RunConfigFile.model_validate({"run_id": "r", "dataset": "d.jsonl",
                                         "target": {"model_path": "m"}, **extra})


def _proto(cfg: RunConfigFile):
    return to_proto(cfg, num_layers=8, hidden_size=16, vocab_size=100, tokenizer_hash="t",
                    aux_layer_ids=[1, 3, 4])


def test_regeneration_is_off_by_default_and_leaves_the_fingerprint_alone() -> None:
    cfg = _config()
    assert cfg.regenerate is None
    msg = _proto(cfg)
    assert not msg.HasField("regenerate")
    unset = _proto(_config())
    assert run_fingerprint(msg, "v") == run_fingerprint(unset, "v")


def test_every_generation_setting_is_carried_and_fingerprinted() -> None:
    settings = {"mode": "sample", "temperature": 0.7, "top_p": 0.9, "top_k": 20,
                "max_new_tokens": 64, "seed": 5, "per_epoch": True, "on_truncation": "drop"}
    msg = _proto(_config(regenerate=settings))
    r = msg.regenerate
    got = {"mode": r.mode, "temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k,
           "max_new_tokens": r.max_new_tokens, "seed": r.seed, "per_epoch": r.per_epoch,
           "on_truncation": r.on_truncation}
    assert got == pytest.approx(settings)
    base = run_fingerprint(_proto(_config()), "v")
    prints = {run_fingerprint(msg, "v")}
    for key, value in [("seed", 6), ("top_k", 10), ("per_epoch", False), ("max_new_tokens", 65),
                       ("on_truncation", "keep"), ("temperature", 0.8)]:
        prints.add(run_fingerprint(_proto(_config(regenerate={**settings, key: value})), "v"))
    assert len(prints) == 7 and base not in prints
    greedy = run_fingerprint(_proto(_config(regenerate={})), "v")
    assert greedy != base


@pytest.mark.parametrize(("section", "message"), [
    ({"temperature": 0.5}, "regenerate.temperature applies to mode: sample only"),
    ({"mode": "beam"}, "regenerate.mode"),
    ({"mode": "sample", "temperature": 0}, "regenerate.temperature"),
    ({"mode": "sample", "top_p": 1.5}, "regenerate.top_p"),
    ({"max_new_tokens": 0}, "regenerate.max_new_tokens"),
    ({"on_truncation": "cut"}, "regenerate.on_truncation"),
    ({"per_epochs": True}, "regenerate.per_epochs"),
])
def test_bad_settings_name_the_field(section: dict[str, Any], message: str, tmp_path) -> None:
    import yaml

    from services.config import ConfigError, load_run_config

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run_id": "r", "dataset": "d.jsonl",
                                    "target": {"model_path": "m"}, "regenerate": section}))
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert message in str(err.value)


@pytest.mark.parametrize(("settings", "message"), [
    ({"mode": "beam"}, "config.regenerate.mode: 'beam'; use greedy or sample"),
    ({"on_truncation": ""}, "config.regenerate.on_truncation: ''; use keep or drop"),
    ({"max_new_tokens": 0}, "config.regenerate.max_new_tokens: must be > 0, got 0"),
    ({"mode": "sample", "temperature": 0}, "config.regenerate.temperature: must be > 0"),
    ({"mode": "sample", "top_p": 0}, r"config.regenerate.top_p: 0.0; must be in \(0, 1\]"),
    ({"mode": "sample", "top_k": -1}, "config.regenerate.top_k: -1; must be >= 0"),
])
def test_the_coordinator_refuses_bad_settings_sent_on_the_wire(settings: dict[str, Any],
                                                               message: str) -> None:
    from coordinator.errors import InvalidArgument
    from coordinator.validate import regenerate
    from services.api import run_pb2

    good = {"mode": "greedy", "max_new_tokens": 8, "on_truncation": "keep", "temperature": 1,
            "top_p": 1}
    regenerate(run_pb2.RegenerateConfig(**good))
    with pytest.raises(InvalidArgument, match=message):
        regenerate(run_pb2.RegenerateConfig(**{**good, **settings}))
