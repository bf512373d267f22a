"""Faults in the middle of a run, each in a run of its own: a producer, the trainer group, the
coordinator or the Mooncake master dies. Each run still finishes with exact accounting, and the
steps assigned before the fault keep their composition (nothing is trained twice into the
surviving weights)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal

import pytest
from sqlalchemy import create_engine, text

from tests.e2e.accounting import check_accounting, step_composition
from tests.e2e.cluster import Cluster, Geometry, RunSpec, wait_for
from tests.e2e.conftest import MakeCluster
from trainer.runner import path_from_uri

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

# 36 prompts x 2 epochs = 72 samples: 18 steps of 4, a checkpoint every 2 steps. Faults come
# early, while producers still have prompts to capture. Producers stay until the run ends, so a
# later recapture (a rollback, a lost tensor) finds one running.
SPEC = RunSpec(prompts=36, checkpoint_every=2)


def started(make_cluster: MakeCluster, pg_url: str) -> Cluster:
    cluster = make_cluster(pg_url, SPEC, holder_mb=64)
    cluster.start(producers=2)
    return cluster


def finish(cluster: Cluster, pg_url: str, before: dict[int, frozenset[str]],
           spec: RunSpec = SPEC) -> None:
    status = cluster.wait_done()
    check_accounting(pg_url, spec, status, cluster.out_dir)
    after = step_composition(pg_url, spec.run_id)
    assert before, "the fault came before any step was assigned"
    assert {step: after[step] for step in before} == before


def recaptures(pg_url: str) -> int:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT COALESCE(SUM(generation), 0) FROM samples WHERE run_id = :r"),
                {"r": SPEC.run_id}).scalar_one())
    finally:
        engine.dispose()


def test_producer_killed(make_cluster: MakeCluster, pg_url: str) -> None:
    cluster = started(make_cluster, pg_url)
    cluster.wait_step(2)
    cluster.crash("producer-0")
    before = step_composition(pg_url, SPEC.run_id)
    finish(cluster, pg_url, before)


def test_trainer_killed_and_restarted(make_cluster: MakeCluster, pg_url: str) -> None:
    cluster = started(make_cluster, pg_url)
    cluster.wait_step(SPEC.checkpoint_every + 1)
    cluster.crash("trainer")
    status = cluster.status()
    assert status["state"] == "RUN_STATE_ACTIVE", status
    resume_from = int(status["last_checkpoint_step"])
    assert resume_from >= SPEC.checkpoint_every
    before = step_composition(pg_url, SPEC.run_id)
    restarted = cluster.start_trainer()
    finish(cluster, pg_url, before)
    # The new group resumed from the committed checkpoint and trained each later step once.
    done = re.search(r"trainer done: step (\d+), .*?, (\d+) steps trained here", restarted.log())
    assert done, restarted.tail()
    assert int(done.group(1)) == SPEC.final_step
    assert int(done.group(2)) == SPEC.final_step - resume_from


def session_states(pg_url: str) -> dict[str, int]:
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            return dict(conn.execute(text(
                "SELECT state, COUNT(*) FROM sessions WHERE run_id = :r AND role = 'TRAINER' "
                "GROUP BY state"), {"r": SPEC.run_id}).all())
    finally:
        engine.dispose()


def test_a_second_trainer_group_fences_the_first(make_cluster: MakeCluster, pg_url: str) -> None:
    # Sessions outlive the pause below by far: the old group is refused because a newer group
    # replaced it, not because it went quiet.
    spec = dataclasses.replace(SPEC, heartbeat_misses=300)
    cluster = make_cluster(pg_url, spec, holder_mb=64)
    cluster.start(producers=0)
    wait_for(lambda: session_states(pg_url).get("ACTIVE", 0) == 2, 120, "the trainer ranks")
    producers = [cluster.start_producer(i) for i in range(2)]
    cluster.wait_step(spec.checkpoint_every + 1)
    # Starve the old group (it cannot reach the end of the data), then hang it: it is alive
    # and registered, and would commit again if woken.
    for proc in producers:
        os.killpg(proc.process.pid, signal.SIGSTOP)
    old = cluster.procs.pop("trainer")
    cluster.crashed.append(old)  # its exit is the point of the test, not a failure
    os.killpg(old.process.pid, signal.SIGSTOP)
    try:
        assert cluster.status()["state"] == "RUN_STATE_ACTIVE"
        before = step_composition(pg_url, spec.run_id)
        cluster.start_trainer()
        wait_for(lambda: session_states(pg_url).get("SUPERSEDED", 0) == 2, 120,
                 "the new group to replace the old one")
    finally:
        for proc in [old, *producers]:
            os.killpg(proc.process.pid, signal.SIGCONT)
    # Woken up, the old group is refused at its next call and stops; it commits nothing.
    assert old.process.wait(timeout=120) != 0, old.tail()
    assert "which a newer trainer group of this run replaced" in old.log(), old.tail()
    finish(cluster, pg_url, before, spec)
    # Every checkpoint committed since holds the new group's weights, never the old group's.
    engine = create_engine(pg_url)
    try:
        with engine.connect() as conn:
            old_group = conn.execute(text(
                "SELECT DISTINCT trainer_group FROM sessions WHERE state = 'SUPERSEDED'")
            ).scalar_one()
            # A commit the old group sent just before it hung may land late; it counts, as it
            # came before the new group registered. What follows must be the new group's.
            uris = conn.execute(text(
                "SELECT uri FROM checkpoints WHERE run_id = :r AND created_at > ("
                "  SELECT MIN(created_at) FROM sessions WHERE run_id = :r AND role = 'TRAINER'"
                "  AND trainer_group <> :old)"), {"r": spec.run_id, "old": old_group}
            ).scalars().all()
    finally:
        engine.dispose()
    assert uris
    for uri in uris:
        meta = json.loads((path_from_uri(uri) / "meta.json").read_text())
        assert meta["trainer_group"] not in ("", old_group), uri


def test_coordinator_restarted_while_training(make_cluster: MakeCluster, pg_url: str) -> None:
    # Capture everything first, then train: the restart meets the trainer group alone.
    spec = RunSpec(prompts=40, geometry=Geometry(world=2, micro=1), checkpoint_every=4,
                   high_samples=80, low_samples=40)
    cluster = make_cluster(pg_url, spec, holder_mb=64)
    cluster.start(producers=2, trainer=False, exit_when_captured=True)
    for name in ("producer-0", "producer-1"):
        assert cluster.procs[name].process.wait(timeout=120) == 0, cluster.tails()
    cluster.start_trainer()
    cluster.wait_step(2)
    cluster.restart_coordinator()
    before = step_composition(pg_url, spec.run_id)
    status = cluster.wait_done(timeout_s=60)
    check_accounting(pg_url, spec, status, cluster.out_dir)
    after = step_composition(pg_url, spec.run_id)
    assert {step: after[step] for step in before} == before


def test_coordinator_restarted(make_cluster: MakeCluster, pg_url: str) -> None:
    cluster = started(make_cluster, pg_url)
    cluster.wait_step(3)
    cluster.restart_coordinator()
    before = step_composition(pg_url, SPEC.run_id)
    finish(cluster, pg_url, before)


def test_mooncake_master_restarted(make_cluster: MakeCluster, pg_url: str) -> None:
    cluster = started(make_cluster, pg_url)
    cluster.wait_step(2)
    # Restart while captured features wait in the store for a step, so some are surely lost.
    wait_for(lambda: int(cluster.status()["samples"].get("READY", 0)) > 0, 60,
             "samples waiting in the store")
    cluster.restart_master()
    before = step_composition(pg_url, SPEC.run_id)
    finish(cluster, pg_url, before)
    # The restart lost the features in flight; they were recaptured, not skipped.
    assert recaptures(pg_url) > 0
