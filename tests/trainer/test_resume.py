"""`draftflow trainer` killed with -9 and restarted: exactly-once training effect, and the export
of a coordinator-driven run reloads tensor for tensor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from services.api import coordinator_pb2 as cpb
from services.store import open_store
from tests.trainer.coordinated import (
    Feeder,
    create_run,
    make_runner,
    samples,
    status,
    store_url,
    wait_for,
)
from tests.trainer.test_tracking import curves as tensorboard_curves
from trainer import checkpoint as ckpt
from trainer.strategies.eagle3.export import EXPORTED_NAMES

REPO = Path(__file__).resolve().parents[2]
STEPS, PER_STEP, KILL_AFTER, EVERY = 10, 2, 7, 5


def _trainer(coordinator, run_id: str, url: str, out: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "draftflow", "trainer", "--coordinator",
            f"127.0.0.1:{coordinator.port}", "--run", run_id, "--store", url, "--out", str(out),
            "--device", "cpu", "--parallel", "none", "--listen", "127.0.0.1:0",
            "--metrics-port", "-1"]
    # One intra-op thread, as in this test process, so float reductions run in the same order.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _model(out: Path, step: int) -> dict[str, torch.Tensor]:
    state, _ = ckpt.load_checkpoint(ckpt.checkpoint_path(out / "checkpoints", step))
    return state["model"]


def test_killed_trainer_resumes_with_exactly_once_effect(
        tiny, coordinator, stub, master, tmp_path: Path) -> None:
    n = STEPS * PER_STEP
    killed_run, features = create_run(stub, tiny, n, "killed", checkpoint_every=EVERY)
    whole_run, _ = create_run(stub, tiny, n, "whole", checkpoint_every=EVERY)
    writer = open_store(store_url(master, "resume", segment_mb=64, buffer_mb=16))
    reader_url = store_url(master, "resume", buffer_mb=16)
    procs: list[subprocess.Popen[str]] = []
    feeders: list[Feeder] = []
    try:
        # Uninterrupted lineage, in this process: the same two capture batches.
        whole_feeder = Feeder(stub, writer, whole_run, features)
        feeders.append(whole_feeder)
        whole_feeder.feed(KILL_AFTER * PER_STEP)
        whole_feeder.feed(n)
        whole_feeder.stop()
        whole = make_runner(coordinator, "whole", reader_url, tmp_path / "whole", export=False)
        try:
            assert whole.run() == STEPS
        finally:
            whole.close()

        # Killed lineage: data for 7 steps only, so the trainer waits at step 8 when killed.
        feeder = Feeder(stub, writer, killed_run, features)
        feeders.append(feeder)
        feeder.feed(KILL_AFTER * PER_STEP)
        out = tmp_path / "killed"
        first = _trainer(coordinator, "killed", reader_url, out)
        procs.append(first)
        wait_for(lambda: status(stub, "killed").last_committed_step == KILL_AFTER
                 or first.poll() is not None, 120, "step 7 to be committed")
        assert first.poll() is None, first.communicate()[0]
        first.send_signal(signal.SIGKILL)
        first.wait()
        st = status(stub, "killed")
        assert (st.last_committed_step, st.last_checkpoint_step) == (KILL_AFTER, EVERY)
        assert ckpt.latest_complete(out / "checkpoints") == ckpt.checkpoint_path(
            out / "checkpoints", EVERY)

        # The rest of the data, and recaptures of what steps 6-7 had freed, as they are asked.
        feeder.start()
        second = _trainer(coordinator, "killed", reader_url, out)
        procs.append(second)
        output, _ = second.communicate(timeout=180)
        assert second.returncode == 0, output
        assert f"trainer done: step {STEPS}" in output
        assert f"{STEPS - EVERY} steps trained here" in output
        feeder.stop()
    finally:
        for f in feeders:
            f.stop()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        writer.close()

    # Training effect exactly once: bitwise the weights of the uninterrupted lineage.
    resumed, expected = _model(out, STEPS), _model(tmp_path / "whole", STEPS)
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name

    # Every sample trained once in the surviving lineage: one step each, steps full, tensors
    # freed; the ones freed by the rolled-back steps 6-7 were captured again (generation 1).
    rows = samples(coordinator, "killed")
    assert sorted(r.prompt_id for r in rows) == sorted(features)
    assert {r.sample_state for r in rows} == {"RETIRED"}
    per_step = [sum(1 for r in rows if r.step == s) for s in range(1, STEPS + 1)]
    assert per_step == [PER_STEP] * STEPS
    regen = {r.step for r in rows if r.generation == 1}
    assert regen == {EVERY + 1, KILL_AFTER} and all(
        r.generation == 0 for r in rows if r.step not in regen)
    st = status(stub, "killed")
    assert (st.last_committed_step, st.last_checkpoint_step) == (STEPS, STEPS)
    assert st.last_checkpoint_uri == ckpt.checkpoint_path(out / "checkpoints", STEPS).as_uri()

    # The run's history holds every step once, as the surviving lineage trained it; the
    # TensorBoard curves under OUT show the same steps.
    records = stub.GetRunHistory(cpb.GetRunHistoryRequest(run_id="killed")).records
    assert [r.step for r in records] == list(range(1, STEPS + 1))
    assert {"loss", "acc_0", "lr", "data_wait_seconds"} <= set(records[-1].metrics)
    assert [s for s, _ in tensorboard_curves(out)["loss"]] == list(range(1, STEPS + 1))

    # The export of the run reloads as the final weights in the export dtype.
    exported = load_file(str(out / "final" / "model.safetensors"))
    assert sorted(exported) == sorted(EXPORTED_NAMES)
    for name, value in exported.items():
        want = resumed[name]
        assert torch.equal(value, want.to(value.dtype) if want.is_floating_point() else want), name


def test_sigterm_finishes_the_step_checkpoints_and_stops(
        tiny, coordinator, stub, master, tmp_path: Path) -> None:
    run, features = create_run(stub, tiny, 5 * PER_STEP, "term", checkpoint_every=100)
    writer = open_store(store_url(master, "term", segment_mb=64, buffer_mb=16))
    feeder = Feeder(stub, writer, run, features)
    proc = None
    try:
        feeder.feed(2 * PER_STEP)
        proc = _trainer(coordinator, "term", store_url(master, "term", buffer_mb=16),
                        tmp_path / "out")
        wait_for(lambda: status(stub, "term").last_committed_step == 2 or proc.poll() is not None,
                 120, "step 2 to be committed")
        proc.send_signal(signal.SIGTERM)  # honoured after the next step: that one must come
        feeder.feed(PER_STEP)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output
        assert "trainer stopped: step 3" in output
    finally:
        feeder.stop()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        writer.close()
    st = status(stub, "term")
    assert (st.last_committed_step, st.last_checkpoint_step) == (3, 3)
    assert not (tmp_path / "out" / "final").exists()  # stopped early: no export
