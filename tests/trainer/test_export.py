"""The export reloads tensor for tensor, and its names are exactly the documented ones."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.helpers import make_trainer, trainable_state
from trainer.export import export_draft
from trainer.steps import Geometry, InProcessSteps
from trainer.strategies.eagle3.export import EXPORTED_NAMES

DOC = Path(__file__).resolve().parents[2] / "docs" / "export.md"


def _documented_names() -> list[str]:
    text = DOC.read_text().split("## `model.safetensors`")[1].split("## `config.json`")[0]
    return re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE)


def test_export_round_trip(tiny, tmp_path: Path) -> None:
    geo = Geometry(1, 2, 1)
    trainer = make_trainer(tiny, geometry=geo)
    trainer.run(InProcessSteps(tiny.train[:6], geo))
    out = tmp_path / "final"
    names = export_draft(trainer, out)

    assert sorted(names) == sorted(_documented_names()) == sorted(EXPORTED_NAMES)
    loaded = load_file(str(out / "model.safetensors"))
    assert sorted(loaded) == sorted(names)
    state = trainable_state(trainer)
    for name in names:
        expected = state[name]
        if expected.is_floating_point():
            assert loaded[name].dtype == torch.bfloat16
            expected = expected.to(torch.bfloat16)
        assert torch.equal(loaded[name], expected), name
    draft_ids = loaded["d2t"] + torch.arange(loaded["d2t"].numel())
    assert draft_ids.tolist() == list(tiny.draft_token_ids)
    assert torch.nonzero(loaded["t2d"]).flatten().tolist() == list(tiny.draft_token_ids)

    config = json.loads((out / "config.json").read_text())
    h = trainer.head.hidden_size
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    assert config["draft_vocab_size"] == len(tiny.draft_token_ids)
    assert config["vocab_size"] == trainer.head.vocab_size
    assert config["target_hidden_size"] == h and config["hidden_size"] == h
    assert config["num_hidden_layers"] == 1 and config["tie_word_embeddings"] is False
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == tiny.aux_layer_ids
    assert loaded["fc.weight"].shape == (h, 3 * h)
    assert loaded["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * h

    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        export_draft(trainer, out)
    export_draft(trainer, out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_exported_files_take_the_umask_mode(tiny, tmp_path: Path) -> None:
    """Whoever serves the draft may be another user: files are not left 0600 (safetensors'
    own mode) but get what the umask allows, as any file this process creates."""
    import os

    geo = Geometry(1, 2, 1)
    trainer = make_trainer(tiny, geometry=geo)
    out = tmp_path / "final"
    old = os.umask(0o022)
    try:
        export_draft(trainer, out)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
