"""Outages a run waits out, every role its own process: the database cut for seconds, and the
coordinator gone for longer than a session lives. Each run finishes with exact accounting, read
from the database and through grpcurl, with no role restarted by hand."""

from __future__ import annotations

import dataclasses
import json
import re
import time

import pytest
from sqlalchemy.engine import make_url

from tests.e2e.accounting import check_accounting, step_composition
from tests.e2e.cluster import Cluster, RunSpec
from tests.e2e.conftest import MakeCluster
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SPEC = RunSpec(prompts=36, checkpoint_every=2)
DB_CUT_S = 5.0


def actions(log: str, action: str) -> list[dict[str, object]]:
    """The JSON log events of one ``action`` in a role's log."""
    found = []
    for line in log.splitlines():
        if line.startswith("{") and f'"{action}"' in line:
            record = json.loads(line)
            if record.get("action") == action:
                found.append(record)
    return found


def finish(cluster: Cluster, pg_url: str, before: dict[int, frozenset[str]],
           spec: RunSpec = SPEC) -> None:
    status = cluster.wait_done()
    check_accounting(pg_url, spec, status, cluster.out_dir)
    after = step_composition(pg_url, spec.run_id)
    assert before, "the outage came before any step was assigned"
    assert {step: after[step] for step in before} == before


def test_database_cut_mid_run(make_cluster: MakeCluster, pg_url: str) -> None:
    url = make_url(pg_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    try:
        via = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        cluster = make_cluster(via, SPEC, holder_mb=64)
        cluster.start(producers=2)
        cluster.wait_step(2)
        before = step_composition(pg_url, SPEC.run_id)
        proxy.cut()
        time.sleep(DB_CUT_S)
        assert proxy.refused > 0, "nothing tried the database while it was cut"
        proxy.restore()
        finish(cluster, pg_url, before)
    finally:
        proxy.close()
    coordinator = cluster.procs["coordinator"].log()
    errors = actions(coordinator, "db_error")
    assert errors and all(e["unreachable"] for e in errors), errors[:3]
    # Both sides met the outage as UNAVAILABLE and waited it out in the same processes.
    retried = [name for name, proc in cluster.procs.items()
               if any(r.get("code") == "UNAVAILABLE"
                      for r in actions(proc.log(), "coordinator_retry"))
               or actions(proc.log(), "stream_reconnect")]
    assert "trainer" in retried and any(n.startswith("producer") for n in retried), retried
    assert not cluster.crashed


def test_coordinator_away_longer_than_a_session_lives(make_cluster: MakeCluster,
                                                      pg_url: str) -> None:
    # Sessions live 5 s (1 s heartbeats, 5 misses); the coordinator is gone for 12 s.
    spec = dataclasses.replace(SPEC, heartbeat_misses=5)
    cluster = make_cluster(pg_url, spec, holder_mb=64)
    cluster.start(producers=2)
    cluster.wait_step(3)
    cluster.crash("coordinator")
    time.sleep(12)
    cluster.start_coordinator()
    before = step_composition(pg_url, spec.run_id)
    finish(cluster, pg_url, before, spec)
    trainer = cluster.procs["trainer"].log()
    # Same trainer process throughout: every rank registered again in its own group and went
    # on from where it was, so this process trained every step of the run exactly once.
    rejoined = actions(trainer, "trainer_rejoined")
    assert sorted(str(r["identity"]).rsplit(":", 1)[1] for r in rejoined) == [
        "rank0", "rank1"], rejoined
    done = re.search(r"trainer done: step (\d+), .*?, (\d+) steps trained here", trainer)
    assert done, cluster.procs["trainer"].tail()
    assert int(done.group(1)) == int(done.group(2)) == spec.final_step
    assert len(actions(trainer, "trainer_registered")) == spec.geometry.world
    assert not actions(trainer, "rollback")
