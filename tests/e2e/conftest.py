"""End-to-end fixtures: a cluster of real processes in a fresh directory, always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import Cluster, RunSpec

MakeCluster = Callable[..., Cluster]


@pytest.fixture
def make_cluster(tmp_path: Path, tiny_target: Path) -> Iterator[MakeCluster]:
    """``make_cluster(db_url, spec=RunSpec(), **fields)``: a cluster this test owns."""
    made: list[Cluster] = []

    def make(db_url: str, spec: RunSpec | None = None, **fields: object) -> Cluster:
        cluster = Cluster(workdir=tmp_path / f"c{len(made)}", db_url=db_url, target=tiny_target,
                          spec=spec or RunSpec(), **fields)  # type: ignore[arg-type]
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()
