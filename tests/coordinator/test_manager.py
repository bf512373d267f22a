"""Every state transition of the coordinator, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from coordinator import db, manager
from coordinator.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SessionExpired,
    SessionSuperseded,
    Unavailable,
)
from coordinator.manager import Coordinator
from services.api import common_pb2, run_pb2
from services.api import coordinator_pb2 as cpb
from services.capture import plan_for
from tests.conftest import ManualClock
from tests.coordinator import helpers as h

PRODUCER = common_pb2.WORKER_ROLE_PRODUCER
TRAINER = common_pb2.WORKER_ROLE_TRAINER


@pytest.fixture
def coord(db_url: str, clock: ManualClock) -> Coordinator:
    engine = db.make_engine(db_url)
    db.migrate(engine)
    yield Coordinator(engine, clock=clock)
    engine.dispose()


def make_run(c: Coordinator, run_id: str = "r1", n: int = 4, **cfg: object) -> run_pb2.RunConfig:
    config = h.run_config(**cfg)
    c.create_run(run_id, config, h.dataset(n), h.vocab_map())
    return config


def producer(c: Coordinator, config: run_pb2.RunConfig, run_id: str = "r1") -> str:
    return c.register_worker(run_id, PRODUCER, h.fingerprint(config), "p").session_id


def trainer(c: Coordinator, config: run_pb2.RunConfig, run_id: str = "r1") -> str:
    return c.register_worker(run_id, TRAINER, h.fingerprint(config), "t", "g").session_id


def capture_all(c: Coordinator, sid: str, run_id: str = "r1") -> list[cpb.PromptLease]:
    leases = c.lease_prompts(sid, 1000).leases
    results = c.commit_samples(sid, [h.commit(le, run_id) for le in leases])
    assert {r.status for r in results} == {cpb.COMMIT_STATUS_ACCEPTED}
    return leases


def counts(c: Coordinator, run_id: str = "r1") -> tuple[dict[str, int], dict[str, int]]:
    st = c.run_status(run_id)
    return ({k: v for k, v in st.prompts.items() if v}, {k: v for k, v in st.samples.items() if v})


# ------------------------------------------------------------------ runs


def test_create_run_dedups_prompts_and_records_bad_rows(coord: Coordinator) -> None:
    lines = [*h.dataset(3), h.dataset(1)[0], "not json", '{"conversations": []}', ""]
    resp = coord.create_run("r1", h.run_config(epochs=2), lines, h.vocab_map())
    assert resp.run.num_prompts == 3
    assert resp.duplicate_prompts == 1
    assert [(b.line, b.reason.split(":")[0]) for b in resp.bad_rows] == [
        (5, "not valid JSON"), (6, "'conversations' must be a non-empty list of turns")]
    assert counts(coord) == ({"PENDING": 6}, {})


def test_create_run_again_is_idempotent_but_refuses_a_different_config(coord: Coordinator
                                                                       ) -> None:
    make_run(coord)
    again = coord.create_run("r1", h.run_config(), h.dataset(4), h.vocab_map())
    assert again.run.num_prompts == 4
    with pytest.raises(AlreadyExists, match="exists with a different dataset_lines; pick"):
        coord.create_run("r1", h.run_config(), h.dataset(5), h.vocab_map())
    changed = h.run_config(epochs=2)
    changed.training.learning_rate = 5e-4
    with pytest.raises(AlreadyExists, match=r"different config\.training\.learning_rate, "
                                            r"config\.epochs; pick another run_id"):
        coord.create_run("r1", changed, h.dataset(4), h.vocab_map())
    assert coord.get_run("r1").config.epochs == 1


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(("path", "value", "message"), [
    ("lease.lease_seconds", NAN, "config.lease.lease_seconds: must be a finite number, got nan"),
    ("lease.lease_seconds", INF, "config.lease.lease_seconds: must be a finite number, got inf"),
    ("lease.lease_seconds", 1e9, r"config.lease.lease_seconds: must be in \(0, 604800\]"),
    ("lease.heartbeat_seconds", NAN, "config.lease.heartbeat_seconds: must be a finite"),
    ("lease.heartbeat_seconds", -INF, "config.lease.heartbeat_seconds: must be > 0, got -inf"),
    ("training.learning_rate", NAN, "config.training.learning_rate: must be a finite"),
    ("training.learning_rate", 3.0, r"config.training.learning_rate: must be in \(0, 1\]"),
    ("training.max_grad_norm", -1.0, r"config.training.max_grad_norm: must be in \[0, 1e\+06\]"),
    ("watermark.retry_after_seconds", NAN, "config.watermark.retry_after_seconds: must be a"),
    ("watermark.low_samples", -1, r"config.watermark.low_samples: must be in \[0, "),
    ("capture.max_length", 1 << 30, r"config.capture.max_length: must be in \[1, 1048576\]"),
    ("draft.ttt_length", 100_000, r"config.draft.ttt_length: must be in \[0, 64\]"),
    ("epochs", 2_000_000_000, r"config.epochs: must be in \[1, 1000\], got 2000000000"),
    ("lease.max_attempts", 1 << 30, r"config.lease.max_attempts: must be in \[1, 1000\]"),
    ("step.micro_batch", 1 << 20, r"config.step.micro_batch: must be in \[1, 4096\]"),
    ("draft.algorithm", "medusa", r"config\.draft\.algorithm.*'medusa'.*eagle3"),
    ("retain", 7, "config.retain: 7 is not a RetainPolicy"),
])
def test_create_run_refuses_out_of_range_values(coord: Coordinator, path: str, value: object,
                                                message: str) -> None:
    cfg = h.run_config()
    *parents, name = path.split(".")
    target = cfg
    for part in parents:
        target = getattr(target, part)
    setattr(target, name, value)
    with pytest.raises(InvalidArgument, match=message):
        coord.create_run("r1", cfg, h.dataset(2), h.vocab_map())
    assert coord.list_runs() == []


def test_watermark_below_one_step_is_refused(coord: Coordinator) -> None:
    cfg = h.run_config(world=2, micro=2, accum=2, high=7, low=2)
    with pytest.raises(InvalidArgument, match=(
            r"config.watermark.high_samples: 7 is below one step's 8 samples .*at least 8")):
        coord.create_run("r1", cfg, h.dataset(16), h.vocab_map())
    coord.create_run("r1", h.run_config(world=2, micro=2, accum=2, high=8, low=2),
                     h.dataset(16), h.vocab_map())


def test_more_samples_than_a_run_holds_is_refused(coord: Coordinator) -> None:
    with pytest.raises(InvalidArgument, match=(
            r"config.epochs: 3000 prompts x 1000 epochs = 3000000 samples, more than the "
            r"2000000 a run may hold")):
        coord.create_run("r1", h.run_config(epochs=1000), h.dataset(3000), h.vocab_map())
    assert coord.list_runs() == []


def test_a_lone_surrogate_is_one_bad_row(coord: Coordinator) -> None:
    rows = [*h.dataset(2), '{"conversations": [{"from": "human", "value": "hi \\ud800"}, '
            '{"from": "gpt", "value": "ok"}]}']
    resp = coord.create_run("r1", h.run_config(), rows, h.vocab_map())
    assert resp.run.num_prompts == 2
    assert [(b.line, b.reason) for b in resp.bad_rows] == [
        (3, "turn 0 text is not valid Unicode: surrogates not allowed at character 3")]


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda c, v: c.capture.ClearField("aux_layer_ids"), "aux_layer_ids"),
    (lambda c, v: c.capture.aux_layer_ids.__setitem__(0, 7), r"out of range"),
    (lambda c, v: c.step.__setattr__("world_size", 0), "config.step.world_size"),
    (lambda c, v: c.__setattr__("retain", 0), "RETAIN_POLICY_UNSPECIFIED"),
    (lambda c, v: v.d2t.append(0), "vocab_map.d2t"),
    (lambda c, v: v.__setattr__("hash", "x"), "vocab_map.hash"),
    (lambda c, v: c.target.__setattr__("tokenizer_hash", ""), "tokenizer_hash"),
])
def test_create_run_refuses_bad_config(coord: Coordinator, mutate, message: str) -> None:
    cfg, vocab = h.run_config(), h.vocab_map()
    mutate(cfg, vocab)
    with pytest.raises(InvalidArgument, match=message):
        coord.create_run("r1", cfg, h.dataset(2), vocab)
    assert coord.list_runs() == []


def test_unknown_run_is_not_found(coord: Coordinator) -> None:
    with pytest.raises(NotFound, match="run 'nope' does not exist"):
        coord.get_run("nope")
    with pytest.raises(NotFound):
        coord.run_status("nope")


def test_cancel_run_stops_leasing(coord: Coordinator) -> None:
    cfg = make_run(coord)
    sid = producer(coord, cfg)
    coord.cancel_run("r1", "operator")
    assert coord.get_run("r1").state == cpb.RUN_STATE_CANCELLED
    res = coord.lease_prompts(sid, 2)
    assert res.leases == [] and res.exhausted
    with pytest.raises(FailedPrecondition, match="cancelled"):
        producer(coord, cfg)


# -------------------------------------------------------------- sessions


def test_fingerprint_mismatch_is_refused_with_both_values(coord: Coordinator) -> None:
    cfg = make_run(coord)
    with pytest.raises(FailedPrecondition) as err:
        coord.register_worker("r1", PRODUCER, "deadbeef", "p")
    assert "deadbeef" in str(err.value) and h.fingerprint(cfg) in str(err.value)


def test_missed_heartbeats_expire_session_and_its_leases(coord: Coordinator,
                                                         clock: ManualClock) -> None:
    cfg = make_run(coord, n=2)
    sid = producer(coord, cfg)
    leases = coord.lease_prompts(sid, 2).leases
    clock.advance(14)
    assert coord.heartbeat(sid)
    clock.advance(14)  # ttl is 5 s x 3 misses from the last heartbeat: still alive
    coord.reap()
    assert counts(coord)[0] == {"LEASED": 2}
    clock.advance(2)
    coord.reap()
    assert counts(coord)[0] == {"PENDING": 2}
    with pytest.raises(FailedPrecondition, match="expired; register again"):
        coord.heartbeat(sid)
    sid2 = producer(coord, cfg)
    again = coord.lease_prompts(sid2, 2).leases
    assert [le.attempt for le in again] == [2, 2]
    assert {le.sample_id for le in again} == {le.sample_id for le in leases}


def test_unregister_gives_leases_back_without_an_attempt(coord: Coordinator) -> None:
    cfg = make_run(coord, n=2)
    sid = producer(coord, cfg)
    coord.lease_prompts(sid, 2)
    assert coord.unregister_worker(sid) == 2
    leases = coord.lease_prompts(producer(coord, cfg), 2).leases
    assert [le.attempt for le in leases] == [1, 1]


# ---------------------------------------------------------------- leases


def test_lease_commit_and_duplicate(coord: Coordinator) -> None:
    cfg = make_run(coord, n=3, epochs=2)
    sid = producer(coord, cfg)
    leases = coord.lease_prompts(sid, 10).leases
    assert [le.epoch for le in leases] == [0, 0, 0, 1, 1, 1]
    assert leases[0].conversation.messages[0].content == "question 0"
    assert leases[0].sample_id == f"{leases[0].prompt_id}:e0"
    commits = [h.commit(le, "r1") for le in leases]
    assert {r.status for r in coord.commit_samples(sid, commits)} == {
        cpb.COMMIT_STATUS_ACCEPTED}
    assert {r.status for r in coord.commit_samples(sid, commits)} == {
        cpb.COMMIT_STATUS_DUPLICATE}
    assert counts(coord) == ({"CAPTURED": 6}, {"READY": 6})
    assert coord.lease_prompts(sid, 1).exhausted


def test_lease_expiry_returns_prompt_and_fences_old_token(coord: Coordinator,
                                                          clock: ManualClock) -> None:
    cfg = make_run(coord, n=1)
    sid = producer(coord, cfg)
    first = coord.lease_prompts(sid, 1).leases[0]
    for _ in range(3):
        clock.advance(10.5)
        coord.heartbeat(sid)
    second = coord.lease_prompts(sid, 1).leases[0]
    assert second.sample_id == first.sample_id and second.lease_token != first.lease_token
    assert second.attempt == 2
    with pytest.raises(FailedPrecondition, match="stale or foreign lease token"):
        coord.commit_samples(sid, [h.commit(first, "r1")])
    assert counts(coord)[0] == {"LEASED": 1}


def test_extend_leases_moves_the_deadline(coord: Coordinator, clock: ManualClock) -> None:
    cfg = make_run(coord, n=1)
    sid = producer(coord, cfg)
    lease = coord.lease_prompts(sid, 1).leases[0]
    for _ in range(2):
        clock.advance(12)
        coord.heartbeat(sid)
    coord.extend_leases(sid, [cpb.LeaseHandle(sample_id=lease.sample_id,
                                              lease_token=lease.lease_token)])
    clock.advance(10)
    coord.heartbeat(sid)
    coord.reap()
    assert counts(coord)[0] == {"LEASED": 1}


def test_fail_prompts_retryable_until_max_attempts_then_dead(coord: Coordinator) -> None:
    cfg = make_run(coord, n=1, max_attempts=2)
    sid = producer(coord, cfg)
    for expected_dead in ([], None):
        lease = coord.lease_prompts(sid, 1).leases[0]
        handle = cpb.LeaseHandle(sample_id=lease.sample_id, lease_token=lease.lease_token)
        dead = coord.fail_prompts(sid, [handle], "oom", retryable=True)
        if expected_dead is not None:
            assert dead == expected_dead
    assert dead == [lease.sample_id]
    assert counts(coord) == ({"DEAD": 1}, {"DEAD": 1})
    assert coord.lease_prompts(sid, 1).exhausted


def test_fail_prompts_not_retryable_is_dead_at_once(coord: Coordinator) -> None:
    cfg = make_run(coord, n=2)
    sid = producer(coord, cfg)
    lease = coord.lease_prompts(sid, 1).leases[0]
    handle = cpb.LeaseHandle(sample_id=lease.sample_id, lease_token=lease.lease_token)
    assert coord.fail_prompts(sid, [handle], "no trainable token", False) == [lease.sample_id]
    assert counts(coord)[0] == {"DEAD": 1, "PENDING": 1}
    with pytest.raises(FailedPrecondition, match="stale"):
        coord.fail_prompts(sid, [handle], "again", False)


def test_watermarks_throttle_with_hysteresis(coord: Coordinator) -> None:
    cfg = make_run(coord, n=8, high=4, low=2, accum=2)
    sid = producer(coord, cfg)
    tid = trainer(coord, cfg)
    leases = coord.lease_prompts(sid, 4).leases
    coord.commit_samples(sid, [h.commit(le, "r1") for le in leases])
    blocked = coord.lease_prompts(sid, 4)
    assert blocked.leases == [] and blocked.retry_after == 0.5 and not blocked.exhausted
    assert coord.run_status("r1").throttled
    sess = coord.open_stream(tid, 0, 1)
    assert coord.deliver(sess, 0, 1, 1).kind == "READY"
    coord.commit_step(tid, 1, 0.5)  # 2 trained: 2 in flight == low mark
    assert len(coord.lease_prompts(sid, 4).leases) == 4
    assert not coord.run_status("r1").throttled


# ------------------------------------------------------------ commits


def test_commit_validation_names_the_field_and_changes_nothing(coord: Coordinator) -> None:
    cfg = make_run(coord, n=2)
    sid = producer(coord, cfg)
    lease = coord.lease_prompts(sid, 1).leases[0]

    def bad(edit, message: str) -> None:
        c = h.commit(lease, "r1")
        edit(c.ref)
        with pytest.raises(InvalidArgument, match=message):
            coord.commit_samples(sid, [c])
        assert counts(coord)[0] == {"LEASED": 1, "PENDING": 1}

    bad(lambda r: r.tensors[0].__setattr__("dtype", 0), r"tensors\[0\]\.dtype: DTYPE_UNSPECIFIED")
    bad(lambda r: r.tensors[0].shape.__setitem__(0, -1), r"tensors\[0\]\.shape: negative")
    bad(lambda r: r.tensors[0].__setattr__("nbytes", 7), r"tensors\[0\]\.nbytes: 7 != shape")
    bad(lambda r: r.tensors.append(r.tensors[0]), r"tensors\[4\]\.name: duplicate")
    bad(lambda r: r.tensors[0].__setattr__("key", "other/r1/x/g0/input_ids"),
        r"tensors\[0\]\.key: .* outside the prefix")
    bad(lambda r: r.__setattr__("run_id", "r2"), r"samples\[0\]\.ref\.run_id")
    bad(lambda r: r.__setattr__("epoch", 3), r"samples\[0\]\.ref\.sample_id")
    bad(lambda r: r.ClearField("tensors"), r"tensors: at least one")
    with pytest.raises(InvalidArgument, match="appears twice"):
        coord.commit_samples(sid, [h.commit(lease, "r1"), h.commit(lease, "r1")])
    other = producer(coord, cfg)
    with pytest.raises(InvalidArgument, match="not leased to this session"):
        coord.commit_samples(other, [h.commit(lease, "r1")])
    foreign = h.commit(lease, "r1")
    foreign.lease_token = "0" * 32
    with pytest.raises(FailedPrecondition, match="stale or foreign"):
        coord.commit_samples(sid, [foreign])
    assert counts(coord)[0] == {"LEASED": 1, "PENDING": 1}


def test_commit_with_wrong_generation_is_rejected_per_ref(coord: Coordinator) -> None:
    cfg = make_run(coord, n=2)
    sid = producer(coord, cfg)
    a, b = coord.lease_prompts(sid, 2).leases
    wrong = h.commit(b, "r1")
    wrong.ref.generation = 1
    for t in wrong.ref.tensors:
        t.key = t.key.replace("/g0/", "/g1/")
    res = coord.commit_samples(sid, [h.commit(a, "r1"), wrong])
    assert [r.status for r in res] == [cpb.COMMIT_STATUS_ACCEPTED, cpb.COMMIT_STATUS_REJECTED]
    assert "generation 1" in res[1].reason
    assert counts(coord)[0] == {"CAPTURED": 1, "LEASED": 1}


def test_refs_that_do_not_fit_the_run_are_rejected_per_sample(coord: Coordinator) -> None:
    """A ref is checked against the run's capture plan, widths, dtypes and max length; a bad
    one is refused alone and the rest of the call goes through."""
    cfg = make_run(coord, n=8)
    sid = producer(coord, cfg)
    leases = coord.lease_prompts(sid, 7).leases

    def edited(lease: cpb.PromptLease, edit) -> cpb.SampleCommit:
        c = h.commit(lease, "r1")
        edit(c.ref)
        return c

    def huge(r: common_pb2.SampleRef) -> None:
        r.num_tokens = 1_000_000_000
        for t in r.tensors:
            t.shape[0] = r.num_tokens
            t.nbytes = t.nbytes // 4 * r.num_tokens

    def narrow(r: common_pb2.SampleRef) -> None:
        r.tensors[2].shape[1] = 47
        r.tensors[2].nbytes = 2 * 4 * 47

    def float_mask(r: common_pb2.SampleRef) -> None:
        r.tensors[1].dtype = common_pb2.DTYPE_FLOAT32
        r.tensors[1].nbytes = 4 * 4

    def dflash_plan(r: common_pb2.SampleRef) -> None:
        r.capture.CopyFrom(plan_for("dflash", [1, 3, 4], 8).to_proto())

    commits = [
        h.commit(leases[0], "r1"),
        edited(leases[1], huge),
        edited(leases[2], narrow),
        edited(leases[3], float_mask),
        edited(leases[4], lambda r: r.tensors.pop()),
        edited(leases[5], dflash_plan),
        edited(leases[6], lambda r: r.capture.CopyFrom(
            plan_for("eagle3", [1, 3, 4], 8).to_proto())),
    ]
    res = coord.commit_samples(sid, commits)
    assert [r.status for r in res] == [cpb.COMMIT_STATUS_ACCEPTED] + [
        cpb.COMMIT_STATUS_REJECTED] * 5 + [cpb.COMMIT_STATUS_ACCEPTED]
    reasons = [r.reason for r in res[1:6]]
    assert "num_tokens 1000000000 exceeds capture.max_length 64" in reasons[0]
    assert "aux_hidden_state has shape [4, 47], expected [4, 48]" in reasons[1]
    assert "loss_mask has dtype DTYPE_FLOAT32" in reasons[2]
    assert "samples of this run hold" in reasons[3]
    assert "this run captures" in reasons[4]
    assert counts(coord)[0] == {"CAPTURED": 2, "LEASED": 5, "PENDING": 1}


def test_producer_session_cannot_stream_and_trainer_cannot_lease(coord: Coordinator) -> None:
    cfg = make_run(coord)
    with pytest.raises(FailedPrecondition, match="needs a trainer session"):
        coord.open_stream(producer(coord, cfg), 0, 1)
    with pytest.raises(FailedPrecondition, match="needs a producer session"):
        coord.lease_prompts(trainer(coord, cfg), 1)
    with pytest.raises(NotFound, match="register the worker first"):
        coord.lease_prompts("nosuchsession", 1)


# ---------------------------------------------------------------- steps


def test_steps_are_deterministic_sliced_and_end_with_a_dropped_tail(coord: Coordinator
                                                                   ) -> None:
    cfg = make_run(coord, n=11, world=2, micro=1, accum=2)
    capture_all(coord, producer(coord, cfg))
    tid = trainer(coord, cfg)
    sess = coord.open_stream(tid, 0, 1)
    r0 = coord.deliver(sess, 0, 1, 1)
    r1 = coord.deliver(sess, 1, 1, 1)
    assert len(r0.refs) == len(r1.refs) == 2
    assert not {r.sample_id for r in r0.refs} & {r.sample_id for r in r1.refs}
    assert coord.deliver(sess, 0, 1, 1).refs == r0.refs  # re-asking gives the same bundle
    assert coord.deliver(sess, 0, 2, 1).kind == "WAIT"  # prefetch 1: step 1 not committed
    assert coord.deliver(sess, 0, 2, 2).kind == "READY"
    coord.commit_step(tid, 1, 1.0)
    coord.commit_step(tid, 2, 0.9)
    end = coord.deliver(sess, 0, 3, 1)
    assert end.kind == "END" and end.dropped == 3
    assert counts(coord)[1] == {"TRAINED": 8, "DROPPED": 3}
    assert coord.get_run("r1").state == cpb.RUN_STATE_COMPLETED


def test_step_waits_for_data_while_more_can_come(coord: Coordinator) -> None:
    cfg = make_run(coord, n=3, accum=2)
    sid = producer(coord, cfg)
    tid = trainer(coord, cfg)
    lease = coord.lease_prompts(sid, 1).leases
    coord.commit_samples(sid, [h.commit(le, "r1") for le in lease])
    sess = coord.open_stream(tid, 0, 1)
    assert coord.deliver(sess, 0, 1, 4).kind == "WAIT"
    capture_all(coord, sid)
    assert coord.deliver(sess, 0, 1, 4).kind == "READY"


def test_commit_step_out_of_order_or_unassigned_is_refused(coord: Coordinator) -> None:
    cfg = make_run(coord, n=4)
    capture_all(coord, producer(coord, cfg))
    tid = trainer(coord, cfg)
    with pytest.raises(FailedPrecondition, match="never assigned"):
        coord.commit_step(tid, 1, 0.0)
    sess = coord.open_stream(tid, 0, 1)
    coord.deliver(sess, 0, 1, 3)
    coord.deliver(sess, 0, 2, 3)
    with pytest.raises(FailedPrecondition, match="out of order: last committed step is 0"):
        coord.commit_step(tid, 2, 0.0)
    coord.commit_step(tid, 1, 0.0)
    coord.commit_step(tid, 1, 0.0)  # a retried commit is idempotent
    assert coord.run_status("r1").last_committed_step == 1


def test_retain_step_retires_on_commit(coord: Coordinator) -> None:
    cfg = make_run(coord, n=2)
    capture_all(coord, producer(coord, cfg))
    tid = trainer(coord, cfg)
    sess = coord.open_stream(tid, 0, 1)
    d = coord.deliver(sess, 0, 1, 1)
    retire = coord.commit_step(tid, 1, 0.1)
    assert [r.sample_id for r in retire] == [r.sample_id for r in d.refs]
    assert coord.retire_samples(tid, [r.sample_id for r in retire]) == 1
    with pytest.raises(FailedPrecondition, match="only TRAINED samples retire"):
        coord.retire_samples(tid, [c for c in [coord.deliver(sess, 0, 2, 1).refs[0].sample_id]])
    with pytest.raises(NotFound):
        coord.retire_samples(tid, ["nope:e0"])


def test_retain_checkpoint_retires_on_checkpoint(coord: Coordinator) -> None:
    cfg = make_run(coord, n=3, retain=run_pb2.RETAIN_POLICY_CHECKPOINT)
    capture_all(coord, producer(coord, cfg))
    tid = trainer(coord, cfg)
    sess = coord.open_stream(tid, 0, 1)
    for step in (1, 2):
        coord.deliver(sess, 0, step, 1)
        assert coord.commit_step(tid, step, 0.1) == []
    retire = coord.commit_checkpoint(tid, 2, "file:///ckpt/2")
    assert len(retire) == 2
    with pytest.raises(FailedPrecondition, match="ahead of the last committed step"):
        coord.commit_checkpoint(tid, 3, "file:///ckpt/3")
    with pytest.raises(FailedPrecondition, match="older than the last checkpoint"):
        coord.commit_checkpoint(tid, 1, "file:///ckpt/1")


def test_resume_from_checkpoint_replays_same_steps_and_recaptures_freed(
        coord: Coordinator) -> None:
    cfg = make_run(coord, n=8, accum=1)
    pid = producer(coord, cfg)
    capture_all(coord, pid)
    tid = trainer(coord, cfg)
    sess = coord.open_stream(tid, 0, 1)
    bundles = {}
    for step in range(1, 5):
        bundles[step] = [r.sample_id for r in coord.deliver(sess, 0, step, 1).refs]
        retire = coord.commit_step(tid, step, 0.1)
        if step == 2:
            coord.commit_checkpoint(tid, 2, "file:///ckpt/2")
        if step == 3:
            coord.retire_samples(tid, [r.sample_id for r in retire])
    # The trainer dies after step 4; a new one resumes from checkpoint 2.
    tid2 = trainer(coord, cfg)
    with pytest.raises(FailedPrecondition, match="resume from the last checkpoint"):
        coord.open_stream(tid2, 0, 2, resume=True)
    with pytest.raises(FailedPrecondition, match="steps up to 4 are committed"):
        coord.open_stream(tid2, 0, 3)  # a late or stale rank never rolls a run back
    assert coord.run_status("r1").last_committed_step == 4
    sess2 = coord.open_stream(tid2, 0, 3, resume=True)
    assert coord.run_status("r1").last_committed_step == 2
    assert coord.deliver(sess2, 0, 3, 1).kind == "WAIT"  # step 3's tensors were freed
    again = coord.lease_prompts(pid, 8).leases
    assert [le.sample_id for le in again] == bundles[3] and again[0].generation == 1
    coord.commit_samples(pid, [h.commit(le, "r1") for le in again])
    replay = coord.deliver(sess2, 0, 3, 1)
    assert [r.sample_id for r in replay.refs] == bundles[3] and replay.refs[0].generation == 1
    assert [r.sample_id for r in coord.deliver(sess2, 0, 4, 2).refs] == bundles[4]


def group_rank(c: Coordinator, config: run_pb2.RunConfig, group: str, rank: int) -> str:
    return c.register_worker("r1", TRAINER, h.fingerprint(config), f"{group}:rank{rank}",
                             group).session_id


def test_a_new_trainer_group_fences_the_old_one(coord: Coordinator) -> None:
    cfg = make_run(coord, n=8, world=2)
    capture_all(coord, producer(coord, cfg))
    old = [group_rank(coord, cfg, "old", rank) for rank in range(2)]  # same group: no fencing
    streams = [coord.open_stream(sid, rank, 1) for rank, sid in enumerate(old)]
    for rank, sess in enumerate(streams):
        assert coord.deliver(sess, rank, 1, 1).kind == "READY"
    coord.commit_step(old[0], 1, 0.5)
    coord.commit_checkpoint(old[0], 1, "file:///ckpt/1")
    for rank, sess in enumerate(streams):
        assert coord.deliver(sess, rank, 2, 1).kind == "READY"

    # The old group hangs (alive, still heartbeating); a new launch takes over the run.
    new = [group_rank(coord, cfg, "new", rank) for rank in range(2)]
    superseded = "belongs to trainer group 'old', which a newer trainer group"
    for call in (lambda: coord.commit_step(old[0], 2, 0.5),
                 lambda: coord.commit_checkpoint(old[0], 1, "file:///ckpt/1"),
                 lambda: coord.heartbeat(old[1]),
                 lambda: coord.deliver(streams[1], 1, 2, 1),
                 lambda: coord.report_lost(old[0], "x:e0", 0, "gone")):
        with pytest.raises(FailedPrecondition, match=superseded):
            call()
    assert coord.run_status("r1").last_committed_step == 1  # nothing the old group did landed
    assert sorted(w.identity for w in coord.run_status("r1").workers
                  if w.role == TRAINER) == ["new:rank0", "new:rank1"]
    resumed = [coord.open_stream(sid, rank, 2, resume=True) for rank, sid in enumerate(new)]
    for rank, sess in enumerate(resumed):
        assert coord.deliver(sess, rank, 2, 1).kind == "READY"
    coord.commit_step(new[0], 2, 0.4)
    assert coord.run_status("r1").last_committed_step == 2
    # A late rank of the new group joins without fencing its own group.
    late = group_rank(coord, cfg, "new", 1)
    coord.heartbeat(new[1])
    coord.heartbeat(late)


def test_only_the_group_the_steps_are_streamed_to_commits(coord: Coordinator) -> None:
    cfg = make_run(coord, n=4)
    capture_all(coord, producer(coord, cfg))
    tid = group_rank(coord, cfg, "g1", 0)
    sess = coord.open_stream(tid, 0, 1)
    assert coord.deliver(sess, 0, 1, 1).kind == "READY"
    with pytest.raises(InvalidArgument, match="trainer_group: required for trainers"):
        coord.register_worker("r1", TRAINER, h.fingerprint(cfg), "no-group")
    # A session of another group than the run's (as a restored database could hold) commits
    # nothing and records no checkpoint.
    with coord.engine.begin() as conn:
        conn.execute(text("UPDATE runs SET trainer_group = 'g2' WHERE run_id = 'r1'"))
    for call in (lambda: coord.commit_step(tid, 1, 0.5),
                 lambda: coord.commit_checkpoint(tid, 1, "file:///ckpt/1")):
        with pytest.raises(SessionSuperseded, match="steps are streamed to group 'g2'"):
            call()
    assert coord.run_status("r1").last_committed_step == 0


@pytest.mark.parametrize(("uri", "message"), [
    ("", "uri: required"),
    ("s3://bucket/ckpt/1", "must be a file:// URI"),
    ("file://other-host/ckpt/1", "must be a file:// URI"),
    ("file:relative/ckpt", "must be file:///ABSOLUTE/PATH"),
    ("file:///ckpt/1?x=1", "without query or fragment"),
    ("file:///ckpt/\n1", "control characters"),
    ("file:///" + "a" * 5000, "at most 4096"),
])
def test_checkpoint_uri_must_be_a_local_absolute_file_uri(coord: Coordinator, uri: str,
                                                         message: str) -> None:
    cfg = make_run(coord, n=2)
    capture_all(coord, producer(coord, cfg))
    tid = trainer(coord, cfg)
    assert coord.deliver(coord.open_stream(tid, 0, 1), 0, 1, 1).kind == "READY"
    coord.commit_step(tid, 1, 0.5)
    with pytest.raises(InvalidArgument, match=message):
        coord.commit_checkpoint(tid, 1, uri)
    coord.commit_checkpoint(tid, 1, "file:///ckpt/step-000000001")


@pytest.mark.parametrize(("role", "group", "message"), [
    (TRAINER, "g" * 65, "trainer_group: at most 64 characters, got 65"),
    (PRODUCER, "g1", "trainer_group: only trainers belong to a trainer group"),
])
def test_bad_trainer_group_is_refused(coord: Coordinator, role: int, group: str,
                                      message: str) -> None:
    cfg = make_run(coord, n=2)
    with pytest.raises(InvalidArgument, match=message):
        coord.register_worker("r1", role, h.fingerprint(cfg), "w", group)
    assert coord.run_status("r1").workers == []


def test_dead_slot_waits_for_a_capture_then_is_refilled(coord: Coordinator) -> None:
    cfg = make_run(coord, n=3, world=1, micro=2, max_deliveries=1)
    pid = producer(coord, cfg)
    leases = coord.lease_prompts(pid, 3).leases
    coord.commit_samples(pid, [h.commit(le, "r1") for le in leases[:2]])
    tid = trainer(coord, cfg)
    sess = coord.open_stream(tid, 0, 1)
    refs = coord.deliver(sess, 0, 1, 1).refs
    assert not coord.report_lost(tid, refs[1].sample_id, 0, "corrupt")  # dead at once
    # The third prompt is still leased: wait for it rather than hand out a short slice.
    assert coord.deliver(sess, 0, 1, 1).kind == "WAIT"
    coord.commit_samples(pid, [h.commit(leases[2], "r1")])
    again = coord.deliver(sess, 0, 1, 1).refs
    assert [r.sample_id for r in again] == [refs[0].sample_id, leases[2].sample_id]
    coord.commit_step(tid, 1, 0.0)
    _, samples = counts(coord)
    assert samples == {"TRAINED": 2, "DEAD": 1}


def test_dead_slot_with_nothing_left_gives_a_short_slice(coord: Coordinator) -> None:
    cfg = make_run(coord, n=2, world=1, micro=2, max_deliveries=1)
    capture_all(coord, producer(coord, cfg))
    tid = trainer(coord, cfg)
    sess = coord.open_stream(tid, 0, 1)
    refs = coord.deliver(sess, 0, 1, 1).refs
    assert not coord.report_lost(tid, refs[0].sample_id, 0, "corrupt")
    short = coord.deliver(sess, 0, 1, 1)
    assert short.kind == "READY" and [r.sample_id for r in short.refs] == [refs[1].sample_id]


def test_report_lost_recaptures_then_dies_after_max_deliveries(coord: Coordinator) -> None:
    cfg = make_run(coord, n=2, max_deliveries=2)
    pid = producer(coord, cfg)
    capture_all(coord, pid)
    tid = trainer(coord, cfg)
    sess = coord.open_stream(tid, 0, 1)
    ref = coord.deliver(sess, 0, 1, 1).refs[0]
    assert coord.report_lost(tid, ref.sample_id, 0, "missing key")
    assert coord.report_lost(tid, ref.sample_id, 0, "missing key")  # idempotent
    assert coord.deliver(sess, 0, 1, 1).kind == "WAIT"
    with pytest.raises(FailedPrecondition, match="awaiting recapture"):
        coord.commit_step(tid, 1, 0.0)
    lease = coord.lease_prompts(pid, 1).leases[0]
    assert (lease.sample_id, lease.generation) == (ref.sample_id, 1)
    coord.commit_samples(pid, [h.commit(lease, "r1")])
    assert coord.deliver(sess, 0, 1, 1).refs[0].generation == 1
    assert not coord.report_lost(tid, ref.sample_id, 1, "corrupt")
    assert counts(coord)[1]["DEAD"] == 1
    # The other captured sample takes the dead one's slot: the step stays full.
    spare = coord.deliver(sess, 0, 1, 1).refs
    assert [r.sample_id for r in spare] != [ref.sample_id] and len(spare) == 1
    assert [r.sample_id for r in coord.deliver(sess, 0, 1, 1).refs] == [spare[0].sample_id]
    coord.commit_step(tid, 1, 0.0)
    assert coord.deliver(sess, 0, 2, 1).kind == "END"  # the spare was the last sample
    with pytest.raises(FailedPrecondition, match="generation"):
        coord.report_lost(tid, ref.sample_id, 5, "x")
    with pytest.raises(NotFound):
        coord.report_lost(tid, "nope:e0", 0, "x")


def test_an_expired_group_registers_again_unless_a_newer_group_took_over(
        coord: Coordinator, clock: ManualClock) -> None:
    cfg = make_run(coord, n=4, world=1)
    capture_all(coord, producer(coord, cfg))
    first = group_rank(coord, cfg, "g1", 0)
    sess = coord.open_stream(first, 0, 1)
    assert coord.deliver(sess, 0, 1, 2).kind == "READY"
    assert coord.deliver(sess, 0, 2, 2).kind == "READY"
    coord.commit_step(first, 1, 0.5)
    clock.advance(16)  # past the 15 s session lifetime: the coordinator was away
    coord.reap()
    with pytest.raises(SessionExpired, match="expired; register again"):
        coord.commit_step(first, 2, 0.5)
    # Same group again: no fencing, and the new session carries on at the next step.
    again = group_rank(coord, cfg, "g1", 0)
    coord.commit_step(again, 2, 0.4)
    resumed = coord.open_stream(again, 0, 3)
    assert coord.deliver(resumed, 0, 3, 2).kind == "READY"
    assert coord.run_status("r1").last_committed_step == 2

    # Away again; a newer group registers meanwhile: the old group may not come back.
    clock.advance(16)
    coord.reap()
    group_rank(coord, cfg, "g2", 0)
    with pytest.raises(SessionSuperseded, match="'g1' was replaced by a newer trainer group"):
        group_rank(coord, cfg, "g1", 0)
    with pytest.raises(SessionSuperseded):
        coord.heartbeat(again)


def test_a_run_is_created_in_short_transactions_and_an_interrupted_creation_resumes(
        coord: Coordinator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager, "INSERT_CHUNK", 3)
    inserted: list[int] = []
    real = Coordinator._insert_samples

    def insert_then_die(conn, rows):  # type: ignore[no-untyped-def]
        if len(inserted) == 2:
            raise ConnectionError("the coordinator died mid-creation")
        real(conn, rows)
        inserted.append(len(rows))

    monkeypatch.setattr(Coordinator, "_insert_samples", staticmethod(insert_then_die))
    cfg = h.run_config(epochs=2)
    with pytest.raises(ConnectionError):
        coord.create_run("r1", cfg, h.dataset(5), h.vocab_map())
    # Two chunks committed, each in its own transaction; the run is not yet workable.
    assert inserted == [3, 3]
    assert coord.get_run("r1").state == cpb.RUN_STATE_CREATING
    assert sum(coord.run_status("r1").prompts.values()) == 6
    with pytest.raises(Unavailable, match="run 'r1' is still being created; retry shortly"):
        producer(coord, cfg)
    with pytest.raises(AlreadyExists, match=r"different config\.epochs"):
        coord.create_run("r1", h.run_config(epochs=3), h.dataset(5), h.vocab_map())

    # Created again with the same config and dataset: it resumes where it stopped.
    monkeypatch.setattr(Coordinator, "_insert_samples", staticmethod(real))
    resp = coord.create_run("r1", cfg, h.dataset(5), h.vocab_map())
    assert resp.run.state == cpb.RUN_STATE_ACTIVE
    leases = coord.lease_prompts(producer(coord, cfg), 100).leases
    assert sorted((le.epoch, le.prompt_id) for le in leases) == sorted(
        {(e, le.prompt_id) for le in leases for e in (0, 1)})
    assert len(leases) == len({le.sample_id for le in leases}) == 10
