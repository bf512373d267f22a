"""A relative ``target.model_path`` means the same directory to every role: the run records it
relative to the config file, not to whichever directory ``run create`` ran in."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from draftflow.run_cli import create_run, create_run_request, run_model_path
from services.api import coordinator_pb2 as cpb
from tests.e2e.cluster import DATASET


def test_relative_paths_are_taken_from_the_config_file() -> None:
    assert run_model_path("/app/examples/tiny.yaml", "../.draftflow/tiny-target") == \
        "/app/.draftflow/tiny-target"
    assert run_model_path("/cfg/run.yaml", "/models/llama") == "/models/llama"


def test_workers_find_the_target_the_run_records(stub, tiny_target: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    shutil.copytree(tiny_target, project / "models" / "tiny")
    (project / "configs" / "data.jsonl").write_text(
        "\n".join(DATASET.read_text().splitlines()[:8]) + "\n")
    config = project / "configs" / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_id": "rel", "dataset": "data.jsonl", "epochs": 1,
        "target": {"model_path": "../models/tiny"},
        "draft": {"draft_vocab_size": 64, "ttt_length": 2},
        "step": {"world_size": 1, "micro_batch": 2, "accumulation": 1},
    }))
    # `run create` from the project directory, with a relative config path.
    monkeypatch.chdir(project)
    create_run(stub, create_run_request(Path("configs/run.yaml")))
    # A worker elsewhere reads the run's path as it is.
    elsewhere = tmp_path / "worker"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recorded = stub.GetRun(cpb.GetRunRequest(run_id="rel")).run.config.target.model_path
    assert recorded == str(project / "models" / "tiny")
    assert os.path.isfile(os.path.join(recorded, "config.json"))
