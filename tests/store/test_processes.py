"""The Mooncake store across OS processes: separate writer and reader, and failures of each part."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from services.store import FeatureLost, FeatureStore, StoreFull, StoreUnavailable, open_store
from services.store.mooncake import READ_ATTEMPTS
from services.store.mooncake_proc import MasterHandle, start_holder, start_master
from tests.store.conftest import mooncake_url
from tests.store.worker import decode, sample

ROOT = Path(__file__).resolve().parents[2]
WORKER = [sys.executable, "-m", "tests.store.worker"]
BOUND_S = 60  # every failure must surface as a typed error well within this


def run_worker(*args: str, prefix: list[str] | None = None) -> str:
    done = subprocess.run(
        [*(prefix or []), *WORKER, *args], cwd=ROOT, capture_output=True, text=True,
        timeout=BOUND_S,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


class Writer:
    """A writer process that owns its segment until stopped."""

    def __init__(self, url: str, name: str, prefix: list[str] | None = None) -> None:
        self.process = subprocess.Popen(
            [*(prefix or []), *WORKER, "write", url, name], cwd=ROOT, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert self.process.stdout is not None
        self.specs_text = self.process.stdout.readline().strip()
        assert self.specs_text, "the writer process printed no specs"

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(BOUND_S)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def writers() -> Iterator[list[Writer]]:
    started: list[Writer] = []
    yield started
    for w in started:
        w.kill()


def within_bound(fn: Callable[[], Any]) -> BaseException | None:
    """Run ``fn`` in a thread; fail the test if it hangs; return what it raised."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(BOUND_S)
    assert not thread.is_alive(), f"call still blocked after {BOUND_S} s"
    return raised[0] if raised else None


def put_retrying_while_full(store: FeatureStore, name: str) -> None:
    while True:
        try:
            store.put_sample("run", name, 0, sample(name))
            return
        except StoreFull:
            time.sleep(0.2)


def test_writer_and_reader_in_separate_processes(mooncake_master: MasterHandle, writers):
    url = mooncake_url(mooncake_master, "procs", segment_mb=16, buffer_mb=8)
    writers.append(w := Writer(url, "a"))
    assert run_worker("read", mooncake_url(mooncake_master, "procs", buffer_mb=8),
                      w.specs_text) == "ok"


def test_many_concurrent_reader_processes(mooncake_master: MasterHandle, writers):
    url = mooncake_url(mooncake_master, "many", segment_mb=16, buffer_mb=8)
    writers.append(w := Writer(url, "b"))
    read_url = mooncake_url(mooncake_master, "many", buffer_mb=8)
    readers = [
        subprocess.Popen([*WORKER, "read", read_url, w.specs_text], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for _ in range(4)
    ]
    outputs = [r.communicate(timeout=BOUND_S)[0].strip() for r in readers]
    assert outputs == ["ok"] * 4


def test_killed_writer_loses_its_samples(fresh_master: MasterHandle, writers):
    url = mooncake_url(fresh_master, "dead", segment_mb=16, buffer_mb=8)
    writers.append(w := Writer(url, "c"))
    reader = open_store(mooncake_url(fresh_master, "dead", buffer_mb=8))
    try:
        specs = decode(w.specs_text)
        assert torch.equal(reader.get_sample(specs)["input_ids"], sample("c")["input_ids"])
        w.kill()
        # First the transfer fails (-800), later the master drops the segment (-704).
        raised = within_bound(lambda: reader.get_sample(specs))
        assert isinstance(raised, FeatureLost), raised
    finally:
        reader.close()


def test_holder_keeps_samples_after_their_writer_exits(fresh_master: MasterHandle, writers):
    holder = start_holder(fresh_master.address, 32)
    try:
        # No segment of its own: the writer's objects land in the holder's segment.
        writers.append(w := Writer(mooncake_url(fresh_master, "held", buffer_mb=8), "d"))
        w.stop()
        assert w.process.returncode == 0
        assert run_worker("read", mooncake_url(fresh_master, "held", buffer_mb=8),
                          w.specs_text) == "ok"
    finally:
        holder.stop()


def test_killed_and_restarted_master(fresh_master: MasterHandle):
    store = open_store(mooncake_url(fresh_master, "mk", segment_mb=16, buffer_mb=8, retries=2))
    try:
        specs = store.put_sample("run", "s", 0, sample("s"))
        fresh_master.kill()
        assert not store.healthy()
        for op in (lambda: store.get_sample(specs),
                   lambda: store.put_sample("run", "t", 0, sample("t")),
                   lambda: store.remove([s.key for s in specs])):
            raised = within_bound(op)
            assert isinstance(raised, StoreUnavailable), raised
            assert "mooncake_master" in str(raised)
        raised = within_bound(lambda: open_store(mooncake_url(fresh_master, "mk")))
        assert isinstance(raised, StoreUnavailable), raised

        fresh_master.process = fresh_master.restart().process
        # The master kept nothing: old samples are lost, new ones are written and read again.
        raised = within_bound(lambda: store.get_sample(specs))
        assert isinstance(raised, FeatureLost), raised
        # Until the client re-mounts its segment on the new master the pool is empty: writers
        # see StoreFull (backpressure) and retry, as they do whenever the pool is full.
        specs_u = within_bound(lambda: put_retrying_while_full(store, "u"))
        assert specs_u is None
        got = store.get_sample(store.put_sample("run", "u", 0, sample("u")))
        assert torch.equal(got["hidden_state"], sample("u")["hidden_state"])
        assert store.healthy()
    finally:
        store.close()


def test_reads_outlasting_the_lease_are_retried_then_reported_lost(
        caplog: pytest.LogCaptureFixture) -> None:
    # A master whose leases end at once: every read outlasts its lease (-707).
    master = start_master(extra_args=["--default_kv_lease_ttl=0"])
    try:
        writer = open_store(master.url("lease", segment_mb=16, buffer_mb=16))
        reader = open_store(master.url("lease", buffer_mb=16))
        specs = writer.put_sample("run", "p:e0", 0, {"x": torch.arange(1000.0)})
        with caplog.at_level("WARNING", logger="services.store.mooncake"), \
                pytest.raises(FeatureLost, match=r"outlasted the master's lease .*-707"):
            reader.get_sample(specs)
        tries = [r for r in caplog.records
                 if getattr(r, "action", "") == "store_read_lease_expired"]
        assert len(tries) == READ_ATTEMPTS
        reader.close()
        writer.close()
    finally:
        master.stop()


def _listeners(pid: int) -> set[str]:
    """Local addresses of ``pid``'s listening TCP sockets, from ``ss``."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines()
            if f"pid={pid}," in line}


def test_master_binds_every_socket_to_the_address_asked(
        caplog: pytest.LogCaptureFixture) -> None:
    master = start_master(host="127.0.0.1")
    try:
        assert _listeners(master.process.pid) == {"127.0.0.1"}
    finally:
        master.stop()
    # The HTTP metadata server is the exception: this Mooncake build binds it everywhere, and
    # starting it says so.
    with caplog.at_level("WARNING", logger="services.store.mooncake_proc"):
        master = start_master(host="127.0.0.1", http_metadata=True)
    try:
        assert [r.port for r in caplog.records  # type: ignore[attr-defined]
                if getattr(r, "action", "") == "metadata_server_listens_everywhere"] == [
            master.http_metadata_port]
        assert _listeners(master.process.pid) == {"127.0.0.1", "0.0.0.0"}
    finally:
        master.stop()


def test_a_store_says_its_transfer_engine_listens_everywhere(
        mooncake_master: MasterHandle, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="services.store.mooncake"):
        store = open_store(mooncake_url(mooncake_master, buffer_mb=16, local="127.0.0.1"))
    try:
        warned = [r for r in caplog.records
                  if getattr(r, "action", "") == "store_listens_everywhere"]
        assert len(warned) == 1 and "127.0.0.1" in warned[0].getMessage()
        # What the warning says: Mooncake binds beyond the address asked for.
        assert _listeners(os.getpid()) - {"127.0.0.1"}
    finally:
        store.close()


def test_documented_master_commands_bind_every_port_they_open() -> None:
    root = Path(__file__).resolve().parents[2]
    commands = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text().replace("\\\n", " ")
        commands += [(doc.name, line) for line in text.splitlines()
                     if line.lstrip().startswith("mooncake_master ")]
    assert commands
    for name, line in commands:
        assert "--rpc_address=" in line and "--metrics_host=" in line, (name, line)
        # Its HTTP metadata server would listen on every interface (see above).
        assert "--enable_http_metadata_server" not in line, (name, line)
