"""``draftflow up`` on DFlash and Domino runs: interrupted part-way, continued to the end, with
the strategy's figures in the summary and an export SGLang's DFlash loader reads."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from tests.e2e.cluster import DATASET, wait_for
from tests.e2e.test_up import committed_step, up

pytestmark = pytest.mark.slow

PROMPTS, EPOCHS, MICRO = 24, 2, 4
STEPS = PROMPTS * EPOCHS // MICRO


@pytest.fixture(scope="module")
def qwen3_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.tiny_model import build_tiny_target

    return build_tiny_target(tmp_path_factory.mktemp("target") / "qwen3", arch="qwen3",
                             num_layers=8, hidden_size=64)


def write_config(tmp_path: Path, target: Path, algorithm: str) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(DATASET.read_text().splitlines()[:PROMPTS]) + "\n")
    draft: dict = {"algorithm": algorithm,
                   "dflash": {"num_hidden_layers": 2, "block_size": 4, "num_anchors": 16,
                              "loss_decay_gamma": 4.0}}
    if algorithm == "domino":
        draft["domino"] = {"emb_dim": 32, "gru_hidden_dim": 32}
    cfg = {
        "run_id": "up-dflash", "dataset": str(data), "epochs": EPOCHS,
        "target": {"model_path": str(target), "revision": "e2e"},
        "capture": {"max_length": 128},
        "draft": draft,
        "step": {"world_size": 1, "micro_batch": MICRO, "accumulation": 1},
        "training": {"learning_rate": 1e-3, "checkpoint_every": 2},
        "lease": {"lease_seconds": 10, "heartbeat_seconds": 1},
        "watermark": {"high_samples": 8, "low_samples": 4, "retry_after_seconds": 0.2},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("algorithm", ["dflash", "domino"])
def test_up_trains_and_exports_a_dflash_family_draft(tmp_path: Path, qwen3_target: Path,
                                                     algorithm: str) -> None:
    config = write_config(tmp_path, qwen3_target, algorithm)
    work = tmp_path / "work"
    first = up(config, work)
    try:
        wait_for(lambda: first.poll() is not None
                 or committed_step(work / "coordinator.db") >= 2, 180, "the first steps")
        assert first.poll() is None, first.communicate()[0]
        first.send_signal(signal.SIGINT)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, out
    assert 2 <= committed_step(work / "coordinator.db") < STEPS

    second = up(config, work)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out
    assert f"{PROMPTS * EPOCHS} trained, 0 dropped" in out
    assert "block positions after the anchor" in out
    assert "--speculative-algorithm DFLASH" in out
    summary = json.loads((work / "runs" / "up-dflash" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["algorithm"] == algorithm
    trainer = summary["trainer"]
    # DFlash predicts block positions 1..3 of a 4-token block; Domino's shift_label all 4.
    assert len(trainer["accuracies"]) == (4 if algorithm == "domino" else 3)
    assert trainer["acceptance_length"] >= 1.0
    assert 0 < trainer["majority_accuracy"] <= 1
    if algorithm == "domino":
        assert {"base_accuracy", "base_accept_len", "base_loss", "lambda_base"} <= set(
            trainer["extras"])
        # Lambda falls to 0 at the end of the run's horizon (every step of both epochs).
        assert trainer["extras"]["lambda_base"] < 1.0
        assert "lambda base" in out

    final = work / "runs" / "up-dflash" / "final"
    config_json = json.loads((final / "config.json").read_text())
    assert config_json["architectures"] == ["DFlashDraftModel"]
    assert "auto_map" not in config_json
    assert config_json["block_size"] == 4 and config_json["num_target_layers"] == 8
    assert config_json["dflash_config"]["target_layer_ids"] == [1, 5]
    with safe_open(str(final / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert {"fc.weight", "hidden_norm.weight", "norm.weight",
            "layers.1.self_attn.q_proj.weight", "layers.1.mlp.down_proj.weight"} <= names
    head = {"prefix_gru.weight_ih_l0", "prefix_gru.weight_hh_l0", "embed_proj.0.weight",
            "embed_proj.2.weight"}
    if algorithm == "domino":
        assert head <= names
        assert config_json["dflash_config"]["projector_type"] == "domino"
        assert config_json["dflash_config"]["pure_draft_prefix_len"] == 1
    else:
        assert not head & names
