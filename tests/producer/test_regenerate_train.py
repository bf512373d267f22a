"""A run that regenerates its answers trains end to end in one process (``draftflow train``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from draftflow.train import TrainOptions, run
from tests.producer.helpers import lines


def test_a_regenerated_run_trains_end_to_end(tmp_path: Path, qwen3_dir: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines(8)) + "\n")
    config = tmp_path / "run.yaml"
    # DFlash drafts over the whole target vocabulary, so every regenerated token is trained on.
    config.write_text(yaml.safe_dump({
        "run_id": "regen", "dataset": str(data),
        "target": {"model_path": str(qwen3_dir), "revision": "tiny"},
        "capture": {"max_length": 96},
        "draft": {"algorithm": "dflash",
                  "dflash": {"num_hidden_layers": 1, "block_size": 4, "num_anchors": 8}},
        "step": {"micro_batch": 4}, "training": {"checkpoint_every": 1},
        "regenerate": {"mode": "sample", "max_new_tokens": 12, "seed": 1},
    }))
    work = tmp_path / "work"
    assert run(TrainOptions(config=config, workdir=work, control_plane=False,
                            progress=False)) == 0
    doc = json.loads((work / "runs" / "regen" / "colocated.json").read_text())
    losses = [loss for _step, loss in doc["losses"]]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    assert list((work / "runs" / "regen" / "final").glob("*.safetensors"))
