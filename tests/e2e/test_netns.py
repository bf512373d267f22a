"""Three "nodes" in network namespaces this test makes: control (coordinator, Mooncake master),
producer (two producers, each lending its own Mooncake segment) and trainer (a two-rank torchrun
group). Veth pairs join each node to a bridge in the control namespace; every address lives in
10.213.N.0/24 inside those namespaces, so no traffic uses the host's network. Features go from
the producer node's memory to the trainer node over the veth links."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.accounting import check_accounting
from tests.e2e.cluster import Node, RunSpec
from tests.e2e.conftest import MakeCluster

pytestmark = pytest.mark.slow


def ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"ip {' '.join(args)}: {out.stderr}"


@pytest.fixture
def three_nodes() -> Iterator[tuple[Node, Node, Node]]:
    """(control, producer, trainer), each in its own namespace; removed even on failure."""
    tag = f"{os.getpid() % 100000}"
    net = f"10.213.{os.getpid() % 250}"
    names = {"control": f"dfe-c{tag}", "producer": f"dfe-p{tag}", "trainer": f"dfe-t{tag}"}
    made: list[str] = []
    try:
        for ns in names.values():
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ctl = names["control"]
        bridge = "br0"
        ip("-n", ctl, "link", "add", bridge, "type", "bridge")
        ip("-n", ctl, "addr", "add", f"{net}.1/24", "dev", bridge)
        ip("-n", ctl, "link", "set", bridge, "up")
        nodes = {"control": Node("control", f"{net}.1", ("ip", "netns", "exec", ctl))}
        for host, role in ((2, "producer"), (3, "trainer")):
            ns = names[role]
            near, far = f"dfb{role[0]}{tag}", f"dfn{role[0]}{tag}"
            ip("link", "add", near, "type", "veth", "peer", "name", far)
            ip("link", "set", near, "netns", ctl)
            ip("link", "set", far, "netns", ns)
            ip("-n", ctl, "link", "set", near, "master", bridge)
            ip("-n", ctl, "link", "set", near, "up")
            ip("-n", ns, "addr", "add", f"{net}.{host}/24", "dev", far)
            ip("-n", ns, "link", "set", far, "up")
            nodes[role] = Node(role, f"{net}.{host}", ("ip", "netns", "exec", ns))
        yield nodes["control"], nodes["producer"], nodes["trainer"]
    finally:
        # Deleting a namespace deletes the veth ends inside it, and with them their peers.
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def test_three_nodes_over_veth_links(three_nodes: tuple[Node, Node, Node],
                                     make_cluster: MakeCluster, tmp_path: Path) -> None:
    # three_nodes first: set up before the cluster, so it is torn down after the processes.
    control, producer, trainer = three_nodes
    db_url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    spec = RunSpec(prompts=24)
    # Beyond loopback every service wants a bearer token.
    cluster = make_cluster(db_url, spec, control=control, producer_node=producer,
                           trainer_node=trainer, token="e2e-secret")
    cluster.start(producers=2)
    status = cluster.wait_done()
    check_accounting(db_url, spec, status, cluster.out_dir)
    # The coordinator and the master listened on the control node's address only.
    log = cluster.procs["coordinator"].log()
    assert f"coordinator listening on port {cluster.coordinator_addr.rsplit(':', 1)[1]}" in log
    assert cluster.master is not None and cluster.master.host == control.addr
