"""Exact accounting of a finished run, from the coordinator's database and its status RPC.

A run is accounted for when every prompt was captured once per epoch, every sample that fits a
whole step sits in exactly one committed step (so it was trained once into the surviving
weights), the rest is a visible DROPPED tail, nothing is LOST or DEAD, and what ``grpcurl``
reports equals what the database holds.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from tests.e2e.cluster import RunSpec


def step_composition(db_url: str, run_id: str) -> dict[int, frozenset[str]]:
    """Sample ids of every assigned step, by step."""
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT step, sample_id FROM samples WHERE run_id = :r AND step IS NOT NULL"),
                {"r": run_id}).all()
    finally:
        engine.dispose()
    steps: dict[int, set[str]] = {}
    for step, sample_id in rows:
        steps.setdefault(int(step), set()).add(sample_id)
    return {k: frozenset(v) for k, v in steps.items()}


def check_accounting(db_url: str, spec: RunSpec, status: dict[str, Any], out_dir: Path) -> None:
    """Assert the finished run's books balance; the messages name what does not."""
    run_id, per_step, final = spec.run_id, spec.geometry.per_step, spec.final_step
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            run = conn.execute(text(
                "SELECT state, last_committed_step, last_checkpoint_step, final_step "
                "FROM runs WHERE run_id = :r"), {"r": run_id}).one()
            samples = conn.execute(text(
                "SELECT sample_id, prompt_id, epoch, prompt_state, sample_state, step, slot "
                "FROM samples WHERE run_id = :r"), {"r": run_id}).all()
            steps = conn.execute(text(
                "SELECT step, size, committed_at FROM steps WHERE run_id = :r ORDER BY step"),
                {"r": run_id}).all()
    finally:
        engine.dispose()

    assert run.state == "COMPLETED", run
    assert run.last_committed_step == run.final_step == final, run
    assert run.last_checkpoint_step == final, run

    # Every prompt captured exactly once per epoch.
    assert len(samples) == spec.samples
    assert len({(s.prompt_id, s.epoch) for s in samples}) == spec.samples
    assert len({s.sample_id for s in samples}) == spec.samples
    assert Counter(s.prompt_state for s in samples) == {"CAPTURED": spec.samples}
    assert Counter(s.epoch for s in samples) == {e: spec.prompts for e in range(spec.epochs)}

    # Every whole step committed once, each holding W*B*A distinct samples in distinct slots.
    assert [s.step for s in steps] == list(range(1, final + 1))
    assert all(s.size == per_step and s.committed_at is not None for s in steps), steps
    by_step: dict[int, list[Any]] = {}
    for s in samples:
        if s.step is not None:
            by_step.setdefault(s.step, []).append(s)
    assert sorted(by_step) == list(range(1, final + 1))
    for step, members in by_step.items():
        assert sorted(m.slot for m in members) == list(range(per_step)), (step, members)
        assert all(m.sample_state in ("TRAINED", "RETIRED") for m in members), (step, members)

    states = Counter(s.sample_state for s in samples)
    trained = states["TRAINED"] + states["RETIRED"]
    assert trained == final * per_step, states
    assert states["DROPPED"] == spec.samples - final * per_step, states
    assert set(states) <= {"TRAINED", "RETIRED", "DROPPED"}, states

    # grpcurl says what the database holds.
    assert status["state"] == "RUN_STATE_COMPLETED", status
    assert int(status.get("last_committed_step", 0)) == final
    assert {k: int(v) for k, v in status["prompts"].items() if int(v)} == {
        "CAPTURED": spec.samples}
    assert {k: int(v) for k, v in status["samples"].items() if int(v)} == {
        k: v for k, v in states.items() if v}

    final_dir = out_dir / "final"
    assert (final_dir / "config.json").is_file(), sorted(out_dir.rglob("*"))
    assert any(final_dir.glob("*.safetensors")), sorted(final_dir.iterdir())
