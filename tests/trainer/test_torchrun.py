"""`torchrun --nproc-per-node 2 -m draftflow trainer` (gloo) against the coordinator matches one
rank trained on the same global batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select

from coordinator.schema import SessionRow
from services.store import open_store
from tests.trainer.coordinated import (
    Feeder,
    create_run,
    make_runner,
    samples,
    status,
    step_losses,
    store_url,
)
from trainer import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_stream_disjoint_slices_and_match_one_rank(
        mode: str, tiny, coordinator, stub, master, tmp_path: Path) -> None:
    n = STEPS * 4
    two_run, features = create_run(stub, tiny, n, "two", world_size=2, micro_batch=1,
                                   accumulation=2, checkpoint_every=STEPS)
    one_run, _ = create_run(stub, tiny, n, "one", world_size=1, micro_batch=1, accumulation=4,
                            checkpoint_every=STEPS)
    writer = open_store(store_url(master, "ranks", segment_mb=64, buffer_mb=16))
    url = store_url(master, "ranks", buffer_mb=16)
    feeders = [Feeder(stub, writer, r, features) for r in (two_run, one_run)]
    try:
        for f in feeders:
            f.feed(n)
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "draftflow", "trainer",
                "--coordinator", f"127.0.0.1:{coordinator.port}", "--run-id", "two", "--store", url,
                "--out", str(tmp_path / "two"), "--device", "cpu", "--listen", "127.0.0.1:0",
                "--metrics-port", "-1", "--parallel", mode]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(argv, cwd=REPO, env=env, text=True, capture_output=True,
                              timeout=240)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"trainer done: step {STEPS}" in done.stdout

        one = make_runner(coordinator, "one", url, tmp_path / "one", export=False)
        try:
            assert one.run() == STEPS
        finally:
            one.close()
    finally:
        for f in feeders:
            f.stop()
        writer.close()

    # Each rank had a session of its own, in one trainer group (so neither fenced the other),
    # and together they covered every sample once.
    with coordinator.engine.connect() as conn:
        sessions = conn.execute(select(SessionRow.identity, SessionRow.trainer_group).where(
            SessionRow.run_id == "two", SessionRow.role == "TRAINER")).all()
    assert sorted(s.identity.rsplit(":", 1)[1] for s in sessions) == ["rank0", "rank1"]
    groups = {s.trainer_group for s in sessions}
    assert len(groups) == 1 and len(groups.pop() or "") == 32
    rows = samples(coordinator, "two")
    assert sorted((r.step, r.slot) for r in rows) == [
        (s, k) for s in range(1, STEPS + 1) for k in range(4)]
    assert status(stub, "two").last_checkpoint_step == STEPS

    # Same global batches: same losses and weights as one rank, within float tolerance.
    assert [r.prompt_id for r in rows] == [r.prompt_id for r in samples(coordinator, "one")]
    # FSDP's sharded forward and gathered reductions round differently: a looser tolerance.
    rel = 1e-5 if mode == "ddp" else 1e-4
    assert step_losses(coordinator, "two") == pytest.approx(
        [loss for _, loss in one.losses], rel=rel)
    two_state, _ = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "two" / "checkpoints",
                                                             STEPS))
    one_state, _ = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "one" / "checkpoints",
                                                             STEPS))
    assert two_state["model"].keys() == one_state["model"].keys()
    if mode == "ddp":  # FSDP's weights drift further from one rank; its losses are checked above
        for name, value in one_state["model"].items():
            torch.testing.assert_close(two_state["model"][name], value, rtol=1e-4, atol=1e-6,
                                       msg=name)
    # The export holds the gathered weights, also when they were sharded.
    exported = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for name, value in exported.items():
        want = two_state["model"][name]
        assert torch.equal(value, want.to(value.dtype) if want.is_floating_point() else want), name
