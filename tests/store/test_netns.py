"""A writer and a reader in two network namespaces joined by a veth pair: real network hops.

The test creates the namespaces, the veth pair and its /30 addresses itself, and removes them
even when it fails.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from services.store.mooncake_proc import MasterHandle, start_master
from tests.store.test_processes import Writer, run_worker


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_namespaces() -> Iterator[tuple[tuple[str, str], tuple[str, str]]]:
    """((ns_a, addr_a), (ns_b, addr_b)), linked by a veth pair on 10.213.N.0/30."""
    tag = f"{os.getpid() % 10000}"
    ns_a, ns_b = f"dfst-a{tag}", f"dfst-b{tag}"
    veth_a, veth_b = f"dfva{tag}", f"dfvb{tag}"
    net = f"10.213.{os.getpid() % 250}"
    host = 4 * (os.getpid() % 60)
    addr_a, addr_b = f"{net}.{host + 1}", f"{net}.{host + 2}"
    try:
        ip("netns", "add", ns_a)
        ip("netns", "add", ns_b)
        ip("link", "add", veth_a, "type", "veth", "peer", "name", veth_b)
        ip("link", "set", veth_a, "netns", ns_a)
        ip("link", "set", veth_b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, veth_a, addr_a), (ns_b, veth_b, addr_b)):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield (ns_a, addr_a), (ns_b, addr_b)
    finally:
        # Deleting a namespace deletes the veth end inside it, and with it the peer.
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def in_ns(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def test_writer_and_reader_across_a_veth_link(two_namespaces):
    (ns_a, addr_a), (ns_b, addr_b) = two_namespaces
    # Fixed ports are safe here: nothing else lives in a namespace this test just created.
    master: MasterHandle = start_master(
        host=addr_a, rpc_port=50061, metrics_port=9003, prefix=in_ns(ns_a)
    )
    writer = None
    try:
        url_a = master.url("veth", local=addr_a, segment_mb=16, buffer_mb=8)
        writer = Writer(url_a, "v", prefix=in_ns(ns_a))
        url_b = master.url("veth", local=addr_b, buffer_mb=8)
        assert run_worker("read", url_b, writer.specs_text, prefix=in_ns(ns_b)) == "ok"
        # The writer dies: the reader on the far side gets a typed loss, not a hang.
        writer.kill()
        out = run_worker("read", url_b, writer.specs_text, prefix=in_ns(ns_b))
        assert out.startswith("ERR FeatureLost"), out
    finally:
        if writer is not None:
            writer.kill()
        master.stop()
