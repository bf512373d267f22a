"""A run's history: recorded per committed step, paged, filtered, durable, replaced on rollback."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from coordinator import db, history
from coordinator.errors import InvalidArgument, NotFound
from coordinator.manager import Coordinator
from coordinator.server import CoordinatorProcess
from services.api import common_pb2, coordinator_pb2_grpc
from services.api import coordinator_pb2 as cpb
from tests.conftest import ManualClock
from tests.coordinator import helpers as h
from tests.coordinator.test_wire import GRPCURL, create, register

PRODUCER = common_pb2.WORKER_ROLE_PRODUCER
TRAINER = common_pb2.WORKER_ROLE_TRAINER


@pytest.fixture
def coord(db_url: str, clock: ManualClock) -> Coordinator:
    engine = db.make_engine(db_url)
    db.migrate(engine)
    yield Coordinator(engine, clock=clock)
    engine.dispose()


def started(c: Coordinator, n: int = 8) -> tuple[str, str, object]:
    """A run ``r1`` of ``n`` one-sample steps, captured, with a trainer streaming from step 1."""
    cfg = h.run_config()
    c.create_run("r1", cfg, h.dataset(n), h.vocab_map())
    pid = c.register_worker("r1", PRODUCER, h.fingerprint(cfg), "p").session_id
    leases = c.lease_prompts(pid, 1000).leases
    c.commit_samples(pid, [h.commit(le, "r1") for le in leases])
    tid = c.register_worker("r1", TRAINER, h.fingerprint(cfg), "t", "g").session_id
    return pid, tid, c.open_stream(tid, 0, 1)


def train(c: Coordinator, tid: str, sess: object, steps: range, loss: float) -> None:
    for step in steps:
        assert c.deliver(sess, 0, step, 1).kind == "READY"
        c.commit_step(tid, step, loss + step, {"acc_0": 0.5, "lr": 1e-4 * step})


def recorded(c: Coordinator, **req: object) -> list[tuple[int, dict[str, float]]]:
    resp = c.run_history(cpb.GetRunHistoryRequest(run_id="r1", **req))
    return [(r.step, dict(r.metrics)) for r in resp.records]


def test_every_committed_step_is_recorded_with_its_loss_and_metrics(
        coord: Coordinator, clock: ManualClock) -> None:
    _, tid, sess = started(coord)
    train(coord, tid, sess, range(1, 4), 1.0)
    rows = recorded(coord)
    assert [s for s, _ in rows] == [1, 2, 3]
    assert rows[1][1] == {"loss": 3.0, "acc_0": 0.5, "lr": 2e-4}
    first = coord.run_history(cpb.GetRunHistoryRequest(run_id="r1")).records[0]
    assert first.committed_at.ToNanoseconds() == int(clock() * 1e9)


def test_range_filter_and_pages(coord: Coordinator) -> None:
    _, tid, sess = started(coord)
    train(coord, tid, sess, range(1, 8), 0.0)
    assert recorded(coord, from_step=3, to_step=5, metric_names=["loss"]) == [
        (3, {"loss": 3.0}), (4, {"loss": 4.0}), (5, {"loss": 5.0})]
    steps, token = [], ""
    while True:
        resp = coord.run_history(cpb.GetRunHistoryRequest(
            run_id="r1", from_step=2, page_size=2, page_token=token))
        steps.append([r.step for r in resp.records])
        token = resp.next_page_token
        if not token:
            break
    assert steps == [[2, 3], [4, 5], [6, 7]]


def test_history_survives_a_restart(db_url: str, clock: ManualClock) -> None:
    engine = db.make_engine(db_url)
    db.migrate(engine)
    c = Coordinator(engine, clock=clock)
    _, tid, sess = started(c)
    train(c, tid, sess, range(1, 4), 0.0)
    engine.dispose()
    engine = db.make_engine(db_url)
    db.migrate(engine)
    assert [s for s, _ in recorded(Coordinator(engine, clock=clock))] == [1, 2, 3]
    engine.dispose()


def test_a_rolled_back_step_is_replaced_not_duplicated(coord: Coordinator) -> None:
    pid, tid, sess = started(coord)
    train(coord, tid, sess, range(1, 3), 0.0)
    coord.commit_checkpoint(tid, 2, "file:///ckpt/2")
    train(coord, tid, sess, range(3, 5), 0.0)
    # The trainer dies after step 4 and a new group resumes from checkpoint 2.
    cfg = h.run_config()
    tid2 = coord.register_worker("r1", TRAINER, h.fingerprint(cfg), "t", "g2").session_id
    sess2 = coord.open_stream(tid2, 0, 3, resume=True)
    assert [s for s, _ in recorded(coord)] == [1, 2]
    leases = coord.lease_prompts(pid, 8).leases  # freed tensors are captured again
    if leases:
        coord.commit_samples(pid, [h.commit(le, "r1") for le in leases])
    train(coord, tid2, sess2, range(3, 5), 100.0)
    assert recorded(coord, metric_names=["loss"]) == [
        (1, {"loss": 1.0}), (2, {"loss": 2.0}), (3, {"loss": 103.0}), (4, {"loss": 104.0})]


@pytest.mark.parametrize(("req", "message"), [
    ({"from_step": -1}, "from_step: must be >= 0, got -1"),
    ({"to_step": -2}, "to_step: must be >= 0"),
    ({"from_step": 5, "to_step": 3}, "to_step: 3 is before from_step 5"),
    ({"page_size": 10_001}, r"page_size: must be in \[0, 10000\]"),
    ({"page_token": "abc"}, "page_token: 'abc' is not a next_page_token"),
    ({"metric_names": [""]}, "metric_names: metric name '' must have 1 to 64 characters"),
])
def test_history_requests_are_validated(coord: Coordinator, req: dict, message: str) -> None:
    started(coord)
    with pytest.raises(InvalidArgument, match=message):
        coord.run_history(cpb.GetRunHistoryRequest(run_id="r1", **req))


def test_unknown_run_and_oversized_metrics_are_refused(coord: Coordinator) -> None:
    _, tid, sess = started(coord)
    with pytest.raises(NotFound, match="run 'nope' does not exist"):
        coord.run_history(cpb.GetRunHistoryRequest(run_id="nope"))
    assert coord.deliver(sess, 0, 1, 1).kind == "READY"
    with pytest.raises(InvalidArgument, match="metrics: 257 metrics, at most 256"):
        coord.commit_step(tid, 1, 0.0, {f"m{i}": 0.0 for i in range(257)})
    with pytest.raises(InvalidArgument, match=r"metrics: metric name 'x+' must have 1 to 64"):
        coord.commit_step(tid, 1, 0.0, {"x" * 65: 0.0})
    assert coord.run_status("r1").last_committed_step == 0


def test_nan_and_infinite_metrics_are_kept_as_they_are(coord: Coordinator) -> None:
    _, tid, sess = started(coord)
    assert coord.deliver(sess, 0, 1, 1).kind == "READY"
    coord.commit_step(tid, 1, 0.5, {"grad_norm": float("inf"), "lambda_base": float("nan")})
    (_, metrics), = recorded(coord)
    assert metrics["grad_norm"] == float("inf") and math.isnan(metrics["lambda_base"])


def test_thinning_keeps_every_step_then_a_bounded_number() -> None:
    limit = history.KEEP_EVERY_STEP_UP_TO
    assert all(history.kept(s) for s in range(1, limit + 1))
    assert [s for s in range(limit + 1, limit + 9) if history.kept(s)] == [
        limit + 2, limit + 4, limit + 6, limit + 8]
    # A million steps: 10,000 kept one by one, then 5,000 per doubling of the step count.
    assert sum(history.kept(s) for s in range(1, 100 * limit + 1)) == 42_812


def test_grpcurl_reads_the_history(coordinator: CoordinatorProcess,
                                   stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    config = create(stub, n=2)
    pid = register(stub, config, PRODUCER)
    leases = stub.LeasePrompts(cpb.LeasePromptsRequest(session_id=pid, max_prompts=8)).leases
    stub.CommitSamples(cpb.CommitSamplesRequest(
        session_id=pid, samples=[h.commit(le, "r1") for le in leases]))
    tid = register(stub, config, TRAINER)
    stream = stub.StreamSteps(cpb.StreamStepsRequest(session_id=tid, rank=0, from_step=1,
                                                     prefetch=1))
    for msg in stream:
        if msg.end_of_data:
            break
        stub.CommitStep(cpb.CommitStepRequest(session_id=tid, step=msg.step, loss=0.5,
                                              metrics={"acc_0": 0.25}))
    target = f"127.0.0.1:{coordinator.port}"
    out = subprocess.run(
        [GRPCURL, "-plaintext", "-d", '{"run_id": "r1", "metric_names": ["acc_0"]}', target,
         "draftflow.v1.CoordinatorService/GetRunHistory"],
        capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)["records"]
    assert [(r["step"], r["metrics"]) for r in records] == [
        ("1", {"acc_0": 0.25}), ("2", {"acc_0": 0.25})]
    bad = subprocess.run(
        [GRPCURL, "-plaintext", "-d", '{"run_id": "r1", "page_size": -1}', target,
         "draftflow.v1.CoordinatorService/GetRunHistory"],
        capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "InvalidArgument" in bad.stderr
    assert "page_size: must be in [0, 10000]" in bad.stderr
