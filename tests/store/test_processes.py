"""The Mooncake store across OS processes: separate writer and reader, and failures of each part."""

from __future__ import annotations

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
from services.store.mooncake_proc import MasterHandle, start_holder
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
