"""One box: coordinator on PostgreSQL, Mooncake master and holder, two producers and a two-rank
trainer, each its own process; the run finishes with exact accounting."""

from __future__ import annotations

import pytest

from tests.e2e.accounting import check_accounting
from tests.e2e.cluster import RunSpec
from tests.e2e.conftest import MakeCluster

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_two_producers_and_two_ranks_finish_with_exact_accounting(
        make_cluster: MakeCluster, pg_url: str) -> None:
    # 31 prompts x 2 epochs = 62 samples: 15 steps of 4 and a DROPPED tail of 2.
    spec = RunSpec(prompts=31)
    cluster = make_cluster(pg_url, spec, holder_mb=64)
    cluster.start(producers=2)
    status = cluster.wait_done()
    check_accounting(pg_url, spec, status, cluster.out_dir)
    # Both producers did part of the work.
    for name in ("producer-0", "producer-1"):
        done = [line for line in cluster.procs[name].log().splitlines()
                if line.startswith("producer done:")]
        assert done and not done[0].startswith("producer done: 0 samples"), done
