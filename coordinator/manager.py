"""The coordinator's domain verbs: runs, sessions, leases, samples, steps, checkpoints.

Every public method is one SQL transaction. ``queries`` holds the statements; this module decides
what they mean. Times come from ``clock`` so tests can move time by hand.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, Row, func, insert, select, text, update
from sqlalchemy import delete as sql_delete
from sqlalchemy.exc import IntegrityError

from coordinator import history, validate
from coordinator import queries as q
from coordinator.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    SessionExpired,
    SessionSuperseded,
    Unavailable,
)
from coordinator.schema import (
    BadRowRow,
    CheckpointRow,
    PromptRow,
    PromptState,
    RunRow,
    SampleRow,
    SampleState,
    SessionRow,
    StepRow,
)
from services.api import common_pb2, run_pb2
from services.api import coordinator_pb2 as cpb
from services.dataset import BadRow, parse_line, prompt_id, sample_id
from services.fingerprint import run_fingerprint
from services.logs import event

log = logging.getLogger(__name__)

S = SampleRow.__table__
RUNS = RunRow.__table__
SESSIONS = SessionRow.__table__
STEPS = StepRow.__table__

ROLE_NAMES = {
    common_pb2.WORKER_ROLE_PRODUCER: "PRODUCER",
    common_pb2.WORKER_ROLE_TRAINER: "TRAINER",
}
RUN_STATES = {
    "ACTIVE": cpb.RUN_STATE_ACTIVE,
    "COMPLETED": cpb.RUN_STATE_COMPLETED,
    "CANCELLED": cpb.RUN_STATE_CANCELLED,
    "CREATING": cpb.RUN_STATE_CREATING,
}


# Leasing reaps expired work of its run at most this often; the server's reaper thread
# covers every run on its own schedule.
REAP_EVERY_SECONDS = 0.5
INSERT_CHUNK = 5_000
"""Sample rows inserted per transaction when a run is created."""


@dataclass
class Session:
    session_id: str
    run_id: str
    role: str
    config: run_pb2.RunConfig
    trainer_group: str = ""


@dataclass
class Delivery:
    """What ``deliver`` found for one rank and step."""

    kind: str
    """READY (refs to send), WAIT (try again later) or END (no step ``step`` will ever exist)."""
    step: int
    refs: list[common_pb2.SampleRef] = field(default_factory=list)
    dropped: int = 0


@dataclass
class LeaseResult:
    leases: list[cpb.PromptLease]
    retry_after: float = 0.0
    exhausted: bool = False
    run_ended: bool = False


class Changes:
    """Wakes streams waiting for new samples or commits in this process (others poll)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._version = 0

    def notify(self) -> None:
        with self._cond:
            self._version += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        with self._cond:
            if self._version == seen:
                self._cond.wait(timeout)
            return self._version

    @property
    def version(self) -> int:
        return self._version


class Coordinator:
    """Domain operations over the coordinator's database."""

    def __init__(self, engine: Engine, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.clock = clock
        self.changes = Changes()
        self._configs: dict[str, run_pb2.RunConfig] = {}
        self._reaped: dict[str, float] = {}

    # ---------------------------------------------------------------- runs

    def create_run(
        self, run_id: str, config: run_pb2.RunConfig, dataset_lines: Sequence[str],
        vocab: run_pb2.VocabMap,
    ) -> cpb.CreateRunResponse:
        validate.run_id(run_id)
        validate.run_config(config, vocab)
        validate.run_limits(config)
        if not dataset_lines:
            raise InvalidArgument("dataset_lines: the dataset is empty")
        validate.dataset_lines(len(dataset_lines))
        bad: list[cpb.BadRow] = []
        prompts: dict[str, bytes] = {}
        duplicates = 0
        for line_no, line in enumerate(dataset_lines, start=1):
            if not line.strip():
                continue
            try:
                conv = parse_line(line)
            except BadRow as e:
                bad.append(cpb.BadRow(line=line_no, reason=str(e)))
                continue
            pid = prompt_id(conv)
            if pid in prompts:
                duplicates += 1
                continue
            prompts[pid] = conv.SerializeToString()
        if not prompts:
            raise InvalidArgument(
                f"dataset_lines: no usable conversation ({len(bad)} bad rows; first: "
                f"{bad[0].reason if bad else 'all lines empty'})"
            )
        validate.run_size(len(prompts), config.epochs)
        fingerprint = run_fingerprint(config, vocab.hash)
        dataset_hash = hashlib.sha256("\n".join(sorted(prompts)).encode()).hexdigest()[:32]
        now = self.clock()
        with self.engine.begin() as conn:
            row = conn.execute(select(RUNS).where(RUNS.c.run_id == run_id)).first()
            if row is not None:
                self._same_as_before(row, config, vocab, dataset_hash)
                if row.state != "CREATING":
                    return cpb.CreateRunResponse(run=self._run_proto(row), bad_rows=bad,
                                                 duplicate_prompts=duplicates)
            else:
                conn.execute(insert(RUNS).values(
                    run_id=run_id, config=config.SerializeToString(),
                    vocab_map=vocab.SerializeToString(), fingerprint=fingerprint,
                    dataset_hash=dataset_hash, state="CREATING", state_reason="",
                    created_at=now, num_prompts=len(prompts), num_bad_rows=len(bad),
                    throttled=False, last_committed_step=0, last_checkpoint_step=0,
                    last_checkpoint_uri="", last_step_loss=0.0, final_step=None, dropped_tail=0,
                ))
                conn.execute(insert(PromptRow.__table__), [
                    {"run_id": run_id, "prompt_id": pid, "position": i, "conversation": blob}
                    for i, (pid, blob) in enumerate(prompts.items())
                ])
                if bad:
                    conn.execute(insert(BadRowRow.__table__), [
                        {"run_id": run_id, "line": b.line, "reason": b.reason} for b in bad
                    ])
        self._fill_samples(run_id, config.epochs)
        with self.engine.begin() as conn:
            conn.execute(update(RUNS).where(RUNS.c.run_id == run_id, RUNS.c.state == "CREATING")
                         .values(state="ACTIVE"))
            run = self._run_proto(self._run_row(conn, run_id))
        if self.engine.dialect.name == "postgresql":
            # Fresh statistics, so the planner uses the indexes from the first lease on.
            with self.engine.connect() as conn:
                conn.execute(text("ANALYZE samples, prompts"))
                conn.commit()
        log.info("run created", extra=event("run_created", run_id=run_id,
                                              prompts=len(prompts), bad_rows=len(bad)))
        return cpb.CreateRunResponse(run=run, bad_rows=bad, duplicate_prompts=duplicates)

    def _fill_samples(self, run_id: str, epochs: int) -> None:
        """Insert the run's samples (every prompt, epoch by epoch), ``INSERT_CHUNK`` rows per
        transaction, from where an earlier, interrupted creation stopped.

        Short transactions keep the database's write lock (SQLite) free for other runs'
        workers between chunks; memory stays bounded whatever prompts x epochs.
        """
        with self.engine.connect() as conn:
            pids = list(conn.execute(select(PromptRow.prompt_id).where(
                PromptRow.run_id == run_id).order_by(PromptRow.position)).scalars())
        total = len(pids) * epochs
        done = -1
        while True:
            try:
                with self.engine.begin() as conn:
                    state = conn.execute(select(RUNS.c.state).where(RUNS.c.run_id == run_id)
                                         .with_for_update()).scalar_one()
                    if state != "CREATING":
                        return  # another creator finished it, or it was cancelled
                    if done < 0:
                        done = conn.execute(select(func.count()).select_from(S).where(
                            S.c.run_id == run_id)).scalar_one()
                    if done >= total:
                        return
                    end = min(done + INSERT_CHUNK, total)
                    self._insert_samples(conn, [
                        {"run_id": run_id, "sample_id": sample_id(pids[i % len(pids)],
                                                                  i // len(pids)),
                         "prompt_id": pids[i % len(pids)], "epoch": i // len(pids),
                         "position": i % len(pids), "prompt_state": PromptState.PENDING,
                         "priority": 1, "sample_state": None, "attempts": 0, "losses": 0,
                         "generation": 0, "reason": "", "nbytes": 0, "num_tokens": 0}
                        for i in range(done, end)])
                done = end
            except IntegrityError:
                done = -1  # a concurrent creator of the same run got there first: recount

    @staticmethod
    def _insert_samples(conn: Connection, rows: list[dict[str, object]]) -> None:
        conn.execute(insert(S), rows)

    def _same_as_before(self, row: Row, config: run_pb2.RunConfig, vocab: run_pb2.VocabMap,
                        dataset_hash: str) -> None:
        """Creating an existing run again is a no-op when nothing differs; else say what."""
        differ = validate.config_differences(self._config(row), config)
        old_vocab = run_pb2.VocabMap()
        old_vocab.ParseFromString(row.vocab_map)
        differ += validate.config_differences(old_vocab, vocab, "vocab_map")
        if row.dataset_hash != dataset_hash:
            differ.append("dataset_lines")
        if differ:
            raise AlreadyExists(
                f"run {row.run_id!r} exists with a different {', '.join(differ)}; pick another "
                "run_id, or create it again with the same config and dataset")

    def get_run(self, run_id: str) -> cpb.Run:
        validate.run_id(run_id)
        with self.engine.connect() as conn:
            return self._run_proto(self._run_row(conn, run_id))

    def list_runs(self) -> list[cpb.Run]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(RUNS).order_by(RUNS.c.created_at)).all()
            return [self._run_proto(r) for r in rows]

    def cancel_run(self, run_id: str, reason: str) -> cpb.Run:
        validate.run_id(run_id)
        with self.engine.begin() as conn:
            row = self._run_row(conn, run_id)
            if row.state in ("ACTIVE", "CREATING"):
                conn.execute(update(RUNS).where(RUNS.c.run_id == run_id).values(
                    state="CANCELLED", state_reason=reason or "cancelled"))
            row = self._run_row(conn, run_id)
            run = self._run_proto(row)
        self.changes.notify()
        log.info("run cancelled", extra=event("run_cancelled", run_id=run_id, reason=reason))
        return run

    # ------------------------------------------------------------ sessions

    def register_worker(
        self, run_id: str, role: int, fingerprint: str, identity: str, trainer_group: str = ""
    ) -> cpb.RegisterWorkerResponse:
        validate.run_id(run_id)
        if role not in ROLE_NAMES:
            raise InvalidArgument("role: must be WORKER_ROLE_PRODUCER or WORKER_ROLE_TRAINER")
        validate.required(fingerprint, "fingerprint")
        if len(trainer_group) > 64:
            raise InvalidArgument(
                f"trainer_group: at most 64 characters, got {len(trainer_group)}")
        if trainer_group and ROLE_NAMES[role] != "TRAINER":
            raise InvalidArgument("trainer_group: only trainers belong to a trainer group")
        if not trainer_group and ROLE_NAMES[role] == "TRAINER":
            raise InvalidArgument(
                "trainer_group: required for trainers: one id shared by every rank of one "
                "launch (draftflow trainer draws it); a newer group's registration fences "
                "older ones")
        now = self.clock()
        with self.engine.begin() as conn:
            row = self._run_row(conn, run_id)
            if row.state == "CANCELLED":
                raise FailedPrecondition(f"run {run_id!r} is cancelled: {row.state_reason}")
            if row.state == "CREATING":
                raise Unavailable(f"run {run_id!r} is still being created; retry shortly")
            if fingerprint != row.fingerprint:
                raise FailedPrecondition(
                    f"fingerprint mismatch for run {run_id!r}: worker has {fingerprint}, run has "
                    f"{row.fingerprint}; check the target revision, tokenizer, chat template, "
                    "capture layers, max length and vocab map on this node"
                )
            config = self._config(row)
            session_id = uuid.uuid4().hex
            superseded = 0
            if trainer_group and trainer_group != row.trainer_group:
                if conn.execute(select(SESSIONS.c.session_id).where(
                        SESSIONS.c.run_id == run_id, SESSIONS.c.trainer_group == trainer_group,
                        SESSIONS.c.state == "SUPERSEDED").limit(1)).first() is not None:
                    raise SessionSuperseded(
                        f"trainer group {trainer_group!r} was replaced by a newer trainer group "
                        "of this run; it cannot register again (the new group resumes from the "
                        "last checkpoint)")
                superseded = self._supersede(conn, run_id, trainer_group)
            conn.execute(insert(SESSIONS).values(
                session_id=session_id, run_id=run_id, role=ROLE_NAMES[role],
                identity=identity[:512], state="ACTIVE", created_at=now, last_heartbeat=now,
                expires_at=now + self._session_ttl(config), trainer_group=trainer_group or None,
            ))
            resp = cpb.RegisterWorkerResponse(
                session_id=session_id,
                heartbeat_interval_seconds=config.lease.heartbeat_seconds,
                run=self._run_proto(row),
                last_committed_step=row.last_committed_step,
                last_checkpoint_step=row.last_checkpoint_step,
                last_checkpoint_uri=row.last_checkpoint_uri,
            )
        log.info("worker registered", extra=event(
            "worker_registered", run_id=run_id, session_id=session_id,
            role=ROLE_NAMES[role], identity=identity, trainer_group=trainer_group))
        if superseded:
            log.warning("a new trainer group replaced the old one", extra=event(
                "trainer_group_superseded", run_id=run_id, trainer_group=trainer_group,
                sessions=superseded))
        return resp

    @staticmethod
    def _supersede(conn: Connection, run_id: str, trainer_group: str) -> int:
        """Make ``trainer_group`` the run's group; refuse every session of older groups.

        Expired sessions are marked too, so an older group that was away (its sessions
        expired) cannot register again and take the run back."""
        conn.execute(update(RUNS).where(RUNS.c.run_id == run_id)
                     .values(trainer_group=trainer_group))
        return conn.execute(update(SESSIONS).where(
            SESSIONS.c.run_id == run_id,
            SESSIONS.c.role == "TRAINER", SESSIONS.c.state.in_(("ACTIVE", "EXPIRED")),
            SESSIONS.c.trainer_group.is_not(None),
            SESSIONS.c.trainer_group != trainer_group).values(state="SUPERSEDED")).rowcount

    def heartbeat(self, session_id: str) -> bool:
        now = self.clock()
        with self.engine.begin() as conn:
            sess = self._session(conn, session_id)
            conn.execute(update(SESSIONS).where(SESSIONS.c.session_id == session_id).values(
                last_heartbeat=now, expires_at=now + self._session_ttl(sess.config)))
            state = conn.execute(
                select(RUNS.c.state).where(RUNS.c.run_id == sess.run_id)).scalar_one()
        return state == "ACTIVE"

    def unregister_worker(self, session_id: str) -> int:
        with self.engine.begin() as conn:
            sess = self._session(conn, session_id)
            released = conn.execute(
                update(S)
                .where(S.c.lease_session == session_id, S.c.prompt_state == PromptState.LEASED)
                .values(prompt_state=PromptState.PENDING, lease_token=None, lease_session=None,
                        lease_deadline=None)
            ).rowcount
            conn.execute(update(SESSIONS).where(SESSIONS.c.session_id == session_id)
                         .values(state="CLOSED"))
        log.info("worker unregistered", extra=event(
            "worker_unregistered", run_id=sess.run_id, session_id=session_id, released=released))
        self.changes.notify()
        return released

    # -------------------------------------------------------------- leases

    def lease_prompts(self, session_id: str, max_prompts: int) -> LeaseResult:
        if max_prompts <= 0:
            raise InvalidArgument(f"max_prompts: must be > 0, got {max_prompts}")
        max_prompts = min(max_prompts, validate.MAX_BATCH)
        now = self.clock()
        with self.engine.begin() as conn:
            sess = self._session(conn, session_id, "PRODUCER")
            cfg = sess.config
            run = self._run_row(conn, sess.run_id)
            if run.state != "ACTIVE":
                return LeaseResult([], exhausted=True, run_ended=True)
            if now - self._reaped.get(sess.run_id, float("-inf")) >= REAP_EVERY_SECONDS:
                self._reap_run(conn, sess.run_id, cfg, now)
                self._reaped[sess.run_id] = now
            throttled = self._update_throttle(conn, run, cfg)
            token = uuid.uuid4().hex
            rows = conn.execute(q.lease_stmt(
                sess.run_id, session_id, token, now + cfg.lease.lease_seconds, max_prompts,
                only_assigned=throttled,
            )).all()
            if not rows:
                pending = conn.execute(
                    select(func.count()).select_from(S).where(
                        S.c.run_id == sess.run_id,
                        S.c.prompt_state.in_((PromptState.PENDING, PromptState.LEASED)))
                ).scalar_one()
                retry = cfg.watermark.retry_after_seconds
                return LeaseResult([], retry_after=retry, exhausted=pending == 0)
            convs = dict(conn.execute(
                select(PromptRow.prompt_id, PromptRow.conversation).where(
                    PromptRow.run_id == sess.run_id,
                    PromptRow.prompt_id.in_({r.prompt_id for r in rows}))
            ).all())
            # A recapture after a loss trains on the tokens generated for the lost capture.
            again = [r.id for r in rows if r.generation > 0]
            previous = dict(conn.execute(
                select(S.c.id, S.c.ref).where(S.c.id.in_(again), S.c.ref.is_not(None))
            ).all()) if again else {}
        leases = []
        for r in sorted(rows, key=lambda r: (r.epoch, r.position)):
            lease = cpb.PromptLease(
                prompt_id=r.prompt_id, epoch=r.epoch, sample_id=r.sample_id,
                generation=r.generation, lease_token=token, attempt=r.attempts + 1,
            )
            lease.deadline.FromNanoseconds(int((now + cfg.lease.lease_seconds) * 1e9))
            lease.conversation.ParseFromString(convs[r.prompt_id])
            if r.id in previous:
                lease.generated.extend(common_pb2.SampleRef.FromString(previous[r.id]).generated)
            leases.append(lease)
        return LeaseResult(leases)

    def extend_leases(self, session_id: str, handles: Sequence[cpb.LeaseHandle]) -> list[float]:
        validate.batch(handles, "leases")
        now = self.clock()
        with self.engine.begin() as conn:
            sess = self._session(conn, session_id, "PRODUCER")
            rows = self._leased_rows(conn, sess, handles)
            deadline = now + sess.config.lease.lease_seconds
            conn.execute(update(S).where(S.c.id.in_([r.id for r in rows]))
                         .values(lease_deadline=deadline))
        return [deadline] * len(handles)

    def fail_prompts(self, session_id: str, handles: Sequence[cpb.LeaseHandle], reason: str,
                     retryable: bool) -> list[str]:
        validate.batch(handles, "leases")
        validate.required(reason, "reason")
        with self.engine.begin() as conn:
            sess = self._session(conn, session_id, "PRODUCER")
            rows = self._leased_rows(conn, sess, handles)
            dead = q.fail_leases(conn, [r.id for r in rows], reason, retryable,
                                 sess.config.lease.max_attempts)
        for sid in dead:
            log.warning("prompt dead", extra=event(
                "prompt_dead", run_id=sess.run_id, sample_id=sid, reason=reason))
        self.changes.notify()
        return dead

    def commit_samples(self, session_id: str, commits: Sequence[cpb.SampleCommit]
                       ) -> list[cpb.CommitResult]:
        validate.batch(commits, "samples")
        now = self.clock()
        with self.engine.begin() as conn:
            sess = self._session(conn, session_id, "PRODUCER")
            seen: set[str] = set()
            for i, c in enumerate(commits):
                validate.sample_ref(c.ref, f"samples[{i}].ref", sess.run_id)
                validate.required(c.lease_token, f"samples[{i}].lease_token")
                if c.ref.sample_id in seen:
                    raise InvalidArgument(
                        f"samples[{i}].ref.sample_id: {c.ref.sample_id!r} appears twice")
                seen.add(c.ref.sample_id)
            rows = {r.sample_id: r for r in conn.execute(
                select(S).where(S.c.run_id == sess.run_id, S.c.sample_id.in_(seen))
            )}
            results: list[cpb.CommitResult] = []
            accepted: list[dict[str, object]] = []
            for i, c in enumerate(commits):
                ref = c.ref
                row = rows.get(ref.sample_id)
                if row is None:
                    raise InvalidArgument(
                        f"samples[{i}].ref.sample_id: unknown sample {ref.sample_id!r} "
                        f"in run {sess.run_id!r}")
                blob = ref.SerializeToString(deterministic=True)
                if row.prompt_state == PromptState.CAPTURED and row.generation == ref.generation:
                    same = row.ref == blob
                    results.append(cpb.CommitResult(
                        sample_id=ref.sample_id,
                        status=cpb.COMMIT_STATUS_DUPLICATE if same else cpb.COMMIT_STATUS_REJECTED,
                        reason="" if same else "already captured with other tensors",
                    ))
                    continue
                if row.lease_token != c.lease_token:
                    raise FailedPrecondition(
                        f"samples[{i}]: stale or foreign lease token for {ref.sample_id!r}: the "
                        "lease expired or was never yours; lease the prompt again")
                if row.lease_session != session_id:
                    raise InvalidArgument(
                        f"samples[{i}].ref.sample_id: {ref.sample_id!r} is not leased to this "
                        "session")
                if row.generation != ref.generation:
                    results.append(cpb.CommitResult(
                        sample_id=ref.sample_id, status=cpb.COMMIT_STATUS_REJECTED,
                        reason=f"generation {ref.generation} != leased generation "
                               f"{row.generation}"))
                    continue
                mismatch = validate.ref_mismatch(ref, sess.config)
                if mismatch is not None:
                    results.append(cpb.CommitResult(
                        sample_id=ref.sample_id, status=cpb.COMMIT_STATUS_REJECTED,
                        reason=f"not a sample of this run: {mismatch}"))
                    continue
                nbytes = sum(t.nbytes for t in ref.tensors)
                accepted.append({
                    "_id": row.id, "ref": blob, "nbytes": nbytes, "num_tokens": ref.num_tokens,
                    "sample_state": SampleState.ASSIGNED if row.step is not None
                    else SampleState.READY,
                    "committed_at": now,
                })
                results.append(cpb.CommitResult(
                    sample_id=ref.sample_id, status=cpb.COMMIT_STATUS_ACCEPTED))
            if accepted:
                conn.execute(q.accept_stmt(), accepted)
        if accepted:
            self.changes.notify()
        return results

    # --------------------------------------------------------------- steps

    def open_stream(self, session_id: str, rank: int, from_step: int, resume: bool = False
                    ) -> Session:
        """Validate a StreamSteps request; roll back to the last checkpoint when resuming."""
        if from_step < 1:
            raise InvalidArgument(f"from_step: steps start at 1, got {from_step}")
        with self.engine.begin() as conn:
            sess = self._session(conn, session_id, "TRAINER")
            world = sess.config.step.world_size
            if not 0 <= rank < world:
                raise InvalidArgument(f"rank: {rank} is outside [0, {world}) for this run")
            run = self._run_row(conn, sess.run_id)
            last, ckpt = run.last_committed_step, run.last_checkpoint_step
            if from_step <= last:
                if not resume or from_step != ckpt + 1:
                    raise FailedPrecondition(
                        f"from_step {from_step}: steps up to {last} are committed; resume from "
                        f"the last checkpoint (from_step={ckpt + 1}) or continue at {last + 1}")
                q.rollback_to(conn, sess.run_id, ckpt)
                history.forget_after(conn, sess.run_id, ckpt)
                log.warning("rolled back to checkpoint", extra=event(
                    "rollback", run_id=sess.run_id, checkpoint_step=ckpt, last_committed=last))
            else:
                top = conn.execute(select(func.coalesce(func.max(STEPS.c.step), 0)).where(
                    STEPS.c.run_id == sess.run_id)).scalar_one()
                if from_step > top + 1:
                    raise FailedPrecondition(
                        f"from_step {from_step}: only steps up to {top} are assigned; continue "
                        f"at {last + 1}")
        self.changes.notify()
        return sess

    def deliver(self, sess: Session, rank: int, step: int, prefetch: int) -> Delivery:
        """This rank's slice of ``step``, assigning the step when it is the next one."""
        geo = sess.config.step
        size = geo.world_size * geo.micro_batch * geo.accumulation
        per_rank = geo.micro_batch * geo.accumulation
        with self.engine.begin() as conn:
            self._session(conn, sess.session_id)  # still ours: not expired or superseded
            run = self._run_row(conn, sess.run_id)
            if run.state == "CANCELLED":
                return Delivery("END", step)
            if run.final_step is not None and step > run.final_step:
                return Delivery("END", step, dropped=run.dropped_tail)
            if step > run.last_committed_step + max(prefetch, 1):
                return Delivery("WAIT", step)
            exists = conn.execute(select(STEPS.c.step).where(
                STEPS.c.run_id == sess.run_id, STEPS.c.step == step)).first()
            if exists is None:
                outcome = q.assign_step(conn, sess.run_id, step, size, self.clock())
                if outcome == "WAIT":
                    return Delivery("WAIT", step)
                if outcome == "END":
                    dropped = conn.execute(select(RUNS.c.dropped_tail).where(
                        RUNS.c.run_id == sess.run_id)).scalar_one()
                    self._maybe_complete(conn, sess.run_id)
                    return Delivery("END", step, dropped=dropped)
            lo, hi = rank * per_rank, (rank + 1) * per_rank
            rows = self._slice(conn, sess.run_id, step, lo, hi)
            if any(r.sample_state == SampleState.DEAD for r in rows):
                filled = q.refill_dead_slots(conn, sess.run_id, step, lo, hi)
                rows = self._slice(conn, sess.run_id, step, lo, hi)
                if filled:
                    log.warning("dead samples replaced in an assigned step", extra=event(
                        "dead_refilled", run_id=sess.run_id, step=step, rank=rank))
                elif q.more_can_come(conn, sess.run_id):
                    return Delivery("WAIT", step)  # a replacement is still being captured
        if any(r.sample_state == SampleState.LOST for r in rows):
            return Delivery("WAIT", step)
        refs = []
        for r in rows:
            if r.sample_state == SampleState.DEAD:
                continue
            ref = common_pb2.SampleRef()
            ref.ParseFromString(r.ref)
            refs.append(ref)
        return Delivery("READY", step, refs)

    @staticmethod
    def _slice(conn: Connection, run_id: str, step: int, lo: int, hi: int) -> list[Row]:
        return list(conn.execute(
            select(S.c.sample_state, S.c.ref).where(
                S.c.run_id == run_id, S.c.step == step, S.c.slot >= lo, S.c.slot < hi)
            .order_by(S.c.slot)).all())

    def commit_step(self, session_id: str, step: int, loss: float,
                    metrics: Mapping[str, float] | None = None) -> list[common_pb2.SampleRef]:
        """Mark ``step`` trained and record its metrics (``loss`` among them) in the history."""
        history.metric_names(list(metrics or ()), "metrics")
        now = self.clock()
        with self.engine.begin() as conn:
            sess = self._session(conn, session_id, "TRAINER")
            run = self._run_row(conn, sess.run_id)
            self._streamed_to(sess, run)
            if step == run.last_committed_step and step > 0:
                retire = q.trained_refs(conn, sess.run_id, step, step)
                return retire if sess.config.retain == run_pb2.RETAIN_POLICY_STEP else []
            if step != run.last_committed_step + 1:
                raise FailedPrecondition(
                    f"step {step} out of order: last committed step is "
                    f"{run.last_committed_step}; commit {run.last_committed_step + 1} next")
            if conn.execute(select(STEPS.c.step).where(
                    STEPS.c.run_id == sess.run_id, STEPS.c.step == step)).first() is None:
                raise FailedPrecondition(f"step {step} was never assigned; stream it first")
            lost = conn.execute(select(func.count()).select_from(S).where(
                S.c.run_id == sess.run_id, S.c.step == step,
                S.c.sample_state == SampleState.LOST)).scalar_one()
            if lost:
                raise FailedPrecondition(
                    f"step {step} has {lost} samples awaiting recapture; train it after they "
                    "are delivered again")
            conn.execute(update(S).where(
                S.c.run_id == sess.run_id, S.c.step == step,
                S.c.sample_state == SampleState.ASSIGNED).values(
                    sample_state=SampleState.TRAINED))
            conn.execute(update(STEPS).where(STEPS.c.run_id == sess.run_id, STEPS.c.step == step)
                         .values(committed_at=now, loss=loss))
            conn.execute(update(RUNS).where(RUNS.c.run_id == sess.run_id).values(
                last_committed_step=step, last_step_loss=loss))
            history.record(conn, sess.run_id, step, now, {"loss": loss, **(metrics or {})})
            self._maybe_complete(conn, sess.run_id)
            retire = (q.trained_refs(conn, sess.run_id, step, step)
                      if sess.config.retain == run_pb2.RETAIN_POLICY_STEP else [])
        self.changes.notify()
        return retire

    def commit_checkpoint(self, session_id: str, step: int, uri: str
                          ) -> list[common_pb2.SampleRef]:
        validate.checkpoint_uri(uri)
        now = self.clock()
        with self.engine.begin() as conn:
            sess = self._session(conn, session_id, "TRAINER")
            run = self._run_row(conn, sess.run_id)
            self._streamed_to(sess, run)
            if step > run.last_committed_step:
                raise FailedPrecondition(
                    f"checkpoint step {step} is ahead of the last committed step "
                    f"{run.last_committed_step}; commit the step first")
            if step < run.last_checkpoint_step or step < 1:
                raise FailedPrecondition(
                    f"checkpoint step {step} is older than the last checkpoint "
                    f"{run.last_checkpoint_step}")
            if step == run.last_checkpoint_step and uri != run.last_checkpoint_uri:
                raise FailedPrecondition(
                    f"checkpoint for step {step} is already committed at "
                    f"{run.last_checkpoint_uri!r}")
            if step > run.last_checkpoint_step:
                conn.execute(insert(CheckpointRow.__table__).values(
                    run_id=sess.run_id, step=step, uri=uri, created_at=now))
                conn.execute(update(RUNS).where(RUNS.c.run_id == sess.run_id).values(
                    last_checkpoint_step=step, last_checkpoint_uri=uri))
            retire = (q.trained_refs(conn, sess.run_id, 1, step)
                      if sess.config.retain == run_pb2.RETAIN_POLICY_CHECKPOINT else [])
        log.info("checkpoint committed", extra=event(
            "checkpoint_committed", run_id=sess.run_id, step=step, uri=uri))
        return retire

    def report_lost(self, session_id: str, sid: str, generation: int, reason: str) -> bool:
        validate.required(sid, "sample_id")
        validate.required(reason, "reason")
        with self.engine.begin() as conn:
            sess = self._session(conn, session_id, "TRAINER")
            row = conn.execute(select(S).where(
                S.c.run_id == sess.run_id, S.c.sample_id == sid)).first()
            if row is None:
                raise NotFound(f"sample {sid!r} does not exist in run {sess.run_id!r}")
            if generation != row.generation:
                if generation < row.generation:
                    return True  # already being recaptured under a newer generation
                raise FailedPrecondition(
                    f"sample {sid!r} is at generation {row.generation}, not {generation}")
            if row.sample_state == SampleState.LOST:
                return True
            if row.sample_state not in (SampleState.READY, SampleState.ASSIGNED,
                                        SampleState.TRAINED):
                raise FailedPrecondition(
                    f"sample {sid!r} is {row.sample_state}; only delivered samples can be lost")
            recapture = q.mark_lost(conn, row, reason, sess.config.lease.max_deliveries)
        log.warning("sample lost", extra=event(
            "sample_lost", run_id=sess.run_id, sample_id=sid, generation=generation,
            reason=reason, recapture=recapture))
        self.changes.notify()
        return recapture

    def retire_samples(self, session_id: str, sample_ids: Sequence[str]) -> int:
        validate.batch(sample_ids, "sample_ids")
        with self.engine.begin() as conn:
            sess = self._session(conn, session_id, "TRAINER")
            rows = conn.execute(select(S.c.sample_id, S.c.sample_state).where(
                S.c.run_id == sess.run_id, S.c.sample_id.in_(set(sample_ids)))).all()
            states = {r.sample_id: r.sample_state for r in rows}
            for i, sid in enumerate(sample_ids):
                if sid not in states:
                    raise NotFound(f"sample_ids[{i}]: {sid!r} does not exist")
                if states[sid] not in (SampleState.TRAINED, SampleState.RETIRED):
                    raise FailedPrecondition(
                        f"sample_ids[{i}]: {sid!r} is {states[sid]}; only TRAINED samples retire")
            return conn.execute(update(S).where(
                S.c.run_id == sess.run_id, S.c.sample_id.in_(set(sample_ids)),
                S.c.sample_state == SampleState.TRAINED).values(
                    sample_state=SampleState.RETIRED)).rowcount

    # -------------------------------------------------------------- status

    def run_status(self, run_id: str) -> cpb.RunStatus:
        validate.run_id(run_id)
        now = self.clock()
        with self.engine.connect() as conn:
            run = self._run_row(conn, run_id)
            return q.status(conn, run, self._config(run), now, RUN_STATES[run.state])

    def run_history(self, request: cpb.GetRunHistoryRequest) -> cpb.GetRunHistoryResponse:
        validate.run_id(request.run_id)
        with self.engine.connect() as conn:
            self._run_row(conn, request.run_id)  # NOT_FOUND for an unknown run
            return history.page(conn, request.run_id, request)

    # ------------------------------------------------------------- reaping

    def reap(self) -> None:
        """Expire silent sessions and overdue leases in every active run."""
        now = self.clock()
        with self.engine.begin() as conn:
            runs = conn.execute(select(RUNS).where(RUNS.c.state == "ACTIVE")).all()
            changed = any(self._reap_run(conn, r.run_id, self._config(r), now) for r in runs)
        if changed:
            self.changes.notify()

    def _reap_run(self, conn: Connection, run_id: str, cfg: run_pb2.RunConfig, now: float
                  ) -> bool:
        expired = conn.execute(
            update(SESSIONS).where(SESSIONS.c.run_id == run_id, SESSIONS.c.state == "ACTIVE",
                                   SESSIONS.c.expires_at < now)
            .values(state="EXPIRED").returning(SESSIONS.c.session_id)
        ).scalars().all()
        for sid in expired:
            log.warning("session expired", extra=event(
                "session_expired", run_id=run_id, session_id=sid))
        overdue = conn.execute(select(S.c.id).where(
            S.c.run_id == run_id, S.c.prompt_state == PromptState.LEASED,
            (S.c.lease_deadline < now) | S.c.lease_session.in_(expired) if expired
            else S.c.lease_deadline < now)).scalars().all()
        if overdue:
            dead = q.fail_leases(conn, list(overdue), "lease expired", True,
                                 cfg.lease.max_attempts)
            log.warning("leases expired", extra=event(
                "leases_expired", run_id=run_id, count=len(overdue), dead=len(dead)))
        return bool(expired or overdue)

    # ------------------------------------------------------------- helpers

    def _update_throttle(self, conn: Connection, run: Row, cfg: run_pb2.RunConfig) -> bool:
        w = cfg.watermark
        if not (w.high_samples or w.high_bytes):
            return False
        count, nbytes = q.in_flight(conn, run.run_id)
        over = (w.high_samples and count >= w.high_samples) or (
            w.high_bytes and nbytes >= w.high_bytes)
        under = (not w.high_samples or count <= w.low_samples) and (
            not w.high_bytes or nbytes <= w.low_bytes)
        throttled = bool(run.throttled)
        if not throttled and over:
            throttled = True
        elif throttled and under:
            throttled = False
        if throttled != bool(run.throttled):
            conn.execute(update(RUNS).where(RUNS.c.run_id == run.run_id)
                         .values(throttled=throttled))
            log.info("watermark", extra=event(
                "throttle" if throttled else "unthrottle", run_id=run.run_id,
                samples=count, bytes=nbytes))
        return throttled

    def _maybe_complete(self, conn: Connection, run_id: str) -> None:
        conn.execute(update(RUNS).where(
            RUNS.c.run_id == run_id, RUNS.c.state == "ACTIVE",
            RUNS.c.final_step.is_not(None),
            RUNS.c.last_committed_step >= RUNS.c.final_step).values(state="COMPLETED"))

    @staticmethod
    def _streamed_to(sess: Session, run: Row) -> None:
        """Only the group the run's steps are streamed to commits them and their checkpoints."""
        if sess.trainer_group != run.trainer_group:
            raise SessionSuperseded(
                f"session {sess.session_id!r} belongs to trainer group {sess.trainer_group!r}, "
                f"but this run's steps are streamed to group {run.trainer_group!r}; only that "
                "group commits them")

    def _run_row(self, conn: Connection, run_id: str) -> Row:
        row = conn.execute(select(RUNS).where(RUNS.c.run_id == run_id)).first()
        if row is None:
            raise NotFound(f"run {run_id!r} does not exist; list runs with `draftflow run list`")
        return row

    def _config(self, row: Row) -> run_pb2.RunConfig:
        cfg = self._configs.get(row.run_id)
        if cfg is None:
            cfg = run_pb2.RunConfig()
            cfg.ParseFromString(row.config)
            self._configs[row.run_id] = cfg
        return cfg

    def _session(self, conn: Connection, session_id: str, role: str | None = None) -> Session:
        validate.required(session_id, "session_id")
        row = conn.execute(select(SESSIONS, RUNS.c.config, RUNS.c.run_id.label("rid"))
                           .join(RUNS, RUNS.c.run_id == SESSIONS.c.run_id)
                           .where(SESSIONS.c.session_id == session_id)).first()
        if row is None:
            raise NotFound(f"session {session_id!r} does not exist; register the worker first")
        state = "EXPIRED" if row.state == "ACTIVE" and row.expires_at < self.clock() else row.state
        if state == "SUPERSEDED":
            raise SessionSuperseded(
                f"session {session_id!r} belongs to trainer group {row.trainer_group!r}, which a "
                "newer trainer group of this run replaced; stop this trainer (the new group "
                "resumes from the last checkpoint)")
        if state == "EXPIRED":
            raise SessionExpired(f"session {session_id!r} is expired; register again")
        if state != "ACTIVE":
            raise FailedPrecondition(
                f"session {session_id!r} is {state.lower()}; register again")
        if role is not None and row.role != role:
            raise FailedPrecondition(
                f"session {session_id!r} is a {row.role.lower()} session; this call needs a "
                f"{role.lower()} session")
        return Session(session_id, row.rid, row.role, self._config_of(row.rid, row.config),
                       row.trainer_group or "")

    def _config_of(self, run_id: str, blob: bytes) -> run_pb2.RunConfig:
        cfg = self._configs.get(run_id)
        if cfg is None:
            cfg = run_pb2.RunConfig()
            cfg.ParseFromString(blob)
            self._configs[run_id] = cfg
        return cfg

    def _leased_rows(self, conn: Connection, sess: Session,
                     handles: Iterable[cpb.LeaseHandle]) -> list:
        handles = list(handles)
        ids = {h.sample_id for h in handles}
        rows = {r.sample_id: r for r in conn.execute(select(S).where(
            S.c.run_id == sess.run_id, S.c.sample_id.in_(ids)))}
        out = []
        for i, h in enumerate(handles):
            validate.required(h.sample_id, f"leases[{i}].sample_id")
            validate.required(h.lease_token, f"leases[{i}].lease_token")
            row = rows.get(h.sample_id)
            if row is None:
                raise InvalidArgument(f"leases[{i}].sample_id: unknown sample {h.sample_id!r}")
            if row.prompt_state != PromptState.LEASED or row.lease_token != h.lease_token:
                raise FailedPrecondition(
                    f"leases[{i}]: stale or foreign lease token for {h.sample_id!r}: the lease "
                    "expired or was never yours")
            if row.lease_session != sess.session_id:
                raise InvalidArgument(
                    f"leases[{i}].sample_id: {h.sample_id!r} is not leased to this session")
            out.append(row)
        return out

    @staticmethod
    def _session_ttl(cfg: run_pb2.RunConfig) -> float:
        return cfg.lease.heartbeat_seconds * cfg.lease.heartbeat_misses

    def _run_proto(self, row: Row) -> cpb.Run:
        run = cpb.Run(run_id=row.run_id, config=self._config(row), state=RUN_STATES[row.state],
                      fingerprint=row.fingerprint, num_prompts=row.num_prompts,
                      num_bad_rows=row.num_bad_rows)
        run.vocab_map.ParseFromString(row.vocab_map)
        run.created_at.FromNanoseconds(int(row.created_at * 1e9))
        return run

    def delete_run(self, run_id: str) -> None:
        """Remove a run and everything it owns (used by tests and `run delete`)."""
        with self.engine.begin() as conn:
            history.forget_run(conn, run_id)
            for table in (S, PromptRow.__table__, SESSIONS, STEPS, CheckpointRow.__table__,
                          BadRowRow.__table__):
                conn.execute(sql_delete(table).where(table.c.run_id == run_id))
            conn.execute(sql_delete(RUNS).where(RUNS.c.run_id == run_id))
