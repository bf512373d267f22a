"""Checkpoints are atomic and resume is bit-exact on CPU."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.trainer.helpers import make_trainer, trainable_state
from trainer import checkpoint as ckpt
from trainer.steps import Geometry, InProcessSteps


def test_partial_checkpoints_are_never_picked_up(tmp_path: Path) -> None:
    assert ckpt.latest_complete(tmp_path) is None
    good = ckpt.save_checkpoint(tmp_path, 5, {"x": torch.ones(2)}, {"algorithm": "eagle3"})
    # A crash mid-save leaves a temp dir; a directory without its files is not complete.
    (tmp_path / ".tmp-step-000000010-1-abc").mkdir()
    (tmp_path / ".tmp-step-000000010-1-abc" / ckpt.STATE_FILE).write_bytes(b"half")
    (tmp_path / "step-000000009").mkdir()
    assert ckpt.latest_complete(tmp_path) == good
    state, meta = ckpt.load_checkpoint(good)
    assert torch.equal(state["x"], torch.ones(2)) and meta["step"] == 5
    assert [p.name for p in ckpt.clean_partial(tmp_path)] == [".tmp-step-000000010-1-abc"]
    # Saving an existing step keeps the complete copy.
    assert ckpt.save_checkpoint(tmp_path, 5, {"x": torch.zeros(2)}, {}) == good
    assert torch.equal(ckpt.load_checkpoint(good)[0]["x"], torch.ones(2))


def test_another_groups_checkpoint_is_never_reused_or_replaced(tmp_path: Path) -> None:
    # A superseded group that woke up wrote step 6 first; the group that replaced it must not
    # commit those weights as its own, nor may either group overwrite the other's.
    theirs = ckpt.save_checkpoint(tmp_path, 6, {"x": torch.zeros(2)}, {"trainer_group": "old"})
    ours = ckpt.save_checkpoint(tmp_path, 6, {"x": torch.ones(2)}, {"trainer_group": "new1"})
    assert (theirs.name, ours.name) == ("step-000000006", "step-000000006-new1")
    assert torch.equal(ckpt.load_checkpoint(theirs)[0]["x"], torch.zeros(2))
    assert torch.equal(ckpt.load_checkpoint(ours)[0]["x"], torch.ones(2))
    assert ckpt.load_checkpoint(ours)[1]["trainer_group"] == "new1"
    # Each group saving again gets its own copy back, untouched.
    assert ckpt.save_checkpoint(tmp_path, 6, {"x": torch.full((2,), 7.0)},
                                {"trainer_group": "new1"}) == ours
    assert ckpt.save_checkpoint(tmp_path, 6, {"x": torch.full((2,), 7.0)},
                                {"trainer_group": "old"}) == theirs
    assert torch.equal(ckpt.load_checkpoint(ours)[0]["x"], torch.ones(2))
    assert [int(ckpt.STEP_OF.match(p.name).group(1)) for p in (theirs, ours)] == [6, 6]


def test_resume_is_bitwise_identical(tiny, tmp_path: Path) -> None:
    geo = Geometry(1, 2, 2)
    samples = tiny.train[: 10 * geo.per_step]

    straight = make_trainer(tiny, geometry=geo)
    assert straight.run(InProcessSteps(samples, geo)) == 10

    first = make_trainer(tiny, geometry=geo, checkpoint_dir=tmp_path / "ck")
    first.run(InProcessSteps(samples, geo), max_steps=7)  # checkpoint at 5, then 2 lost steps
    assert ckpt.latest_complete(tmp_path / "ck").name == "step-000000005"

    second = make_trainer(tiny, geometry=geo, checkpoint_dir=tmp_path / "ck")
    assert second.resume() == 5
    assert second.run(InProcessSteps(samples, geo)) == 10

    a, b = trainable_state(straight), trainable_state(second)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert second.scheduler.get_last_lr() == straight.scheduler.get_last_lr()
