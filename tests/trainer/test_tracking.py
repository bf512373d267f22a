"""TensorBoard event files of a run: one curve per metric, continued across a resume."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.tracking import TENSORBOARD_DIR, TensorBoardLog


def curves(out: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(out / TENSORBOARD_DIR), purge_orphaned_data=True)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_a_resumed_run_continues_the_same_curves(tmp_path: Path) -> None:
    first = TensorBoardLog(tmp_path, 1, "r1")
    assert first.enabled
    for step in range(1, 6):
        first.log(step, {"loss": float(step), "acc_0": 0.5})
    first.close()
    # Killed after step 5, resumed from the checkpoint of step 3: steps 4-5 are trained again.
    second = TensorBoardLog(tmp_path, 4, "r1")
    for step in range(4, 7):
        second.log(step, {"loss": 10.0 * step, "acc_0": 0.75})
    second.close()
    got = curves(tmp_path)
    assert got["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert [s for s, _ in got["acc_0"]] == [1, 2, 3, 4, 5, 6]
