"""SQL statements of the coordinator, in one place. Each runs inside the caller's transaction.

Leasing is one statement: pick PENDING rows with ``FOR UPDATE SKIP LOCKED`` (PostgreSQL; SQLite
holds the writer lock from ``BEGIN IMMEDIATE`` instead) and claim them with ``UPDATE ...
RETURNING``, so two coordinators on one database never hand out the same prompt. Step
assignment locks the run row instead: it must see every READY sample, locked or not.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Update, bindparam, case, func, insert, select, true, update

from coordinator.schema import (
    PromptState,
    RunRow,
    SampleRow,
    SampleState,
    SessionRow,
    StepRow,
)
from services.api import common_pb2, run_pb2
from services.api import coordinator_pb2 as cpb

S = SampleRow.__table__
STEPS = StepRow.__table__
RUNS = RunRow.__table__
SESSIONS = SessionRow.__table__
IN_FLIGHT = (SampleState.READY, SampleState.ASSIGNED)


def lease_stmt(run_id: str, session_id: str, token: str, deadline: float, limit: int,
               only_assigned: bool) -> Update:
    """Claim up to ``limit`` PENDING prompts; recaptures for already-assigned steps go first."""
    pick = (
        select(S.c.id)
        .where(S.c.run_id == run_id, S.c.prompt_state == PromptState.PENDING)
        .order_by(S.c.priority, S.c.epoch, S.c.position)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    if only_assigned:
        pick = pick.where(S.c.priority == 0)
    return (
        update(S)
        .where(S.c.id.in_(pick))
        .values(prompt_state=PromptState.LEASED, lease_token=token, lease_session=session_id,
                lease_deadline=deadline)
        .returning(S.c.id, S.c.sample_id, S.c.prompt_id, S.c.epoch, S.c.position,
                   S.c.generation, S.c.attempts)
    )


def fail_leases(conn: Connection, ids: list[int], reason: str, retryable: bool,
                max_attempts: int) -> list[str]:
    """Count a failed attempt on each leased row; return the sample ids that went DEAD."""
    if not ids:
        return []
    attempts = S.c.attempts + 1
    dies = (attempts >= max_attempts) if retryable else true()
    dead = conn.execute(
        update(S).where(S.c.id.in_(ids), dies)
        .values(prompt_state=PromptState.DEAD, sample_state=SampleState.DEAD,
                attempts=attempts, reason=reason, lease_token=None, lease_session=None,
                lease_deadline=None)
        .returning(S.c.sample_id)
    ).scalars().all()
    if retryable:
        conn.execute(
            update(S).where(S.c.id.in_(ids), S.c.prompt_state == PromptState.LEASED)
            .values(prompt_state=PromptState.PENDING, attempts=attempts, reason=reason,
                    lease_token=None, lease_session=None, lease_deadline=None)
        )
    return list(dead)


def accept_stmt() -> Update:
    """Executemany: a leased row becomes a captured sample (READY, or ASSIGNED on recapture)."""
    return (
        update(S).where(S.c.id == bindparam("_id"))
        .values(prompt_state=PromptState.CAPTURED, priority=1,
                sample_state=bindparam("sample_state"),
                ref=bindparam("ref"), nbytes=bindparam("nbytes"),
                num_tokens=bindparam("num_tokens"), committed_at=bindparam("committed_at"),
                lease_token=None, lease_session=None, lease_deadline=None)
    )


def more_can_come(conn: Connection, run_id: str) -> bool:
    """True while some unassigned prompt may still turn into a READY sample."""
    return conn.execute(
        select(S.c.id).where(
            S.c.run_id == run_id, S.c.step.is_(None),
            S.c.prompt_state.in_((PromptState.PENDING, PromptState.LEASED))).limit(1)
    ).first() is not None


def assign_step(conn: Connection, run_id: str, step: int, size: int, now: float) -> str:
    """Assign the next step from READY samples. Returns ASSIGNED, WAIT or END.

    The run row is locked first, so coordinators sharing a database assign steps one at a time;
    "can more samples come?" is asked before READY rows are counted, so a capture committed in
    between is seen by the count (each statement sees what is committed when it starts).
    """
    conn.execute(select(RUNS.c.run_id).where(RUNS.c.run_id == run_id).with_for_update())
    top = conn.execute(select(func.coalesce(func.max(STEPS.c.step), 0)).where(
        STEPS.c.run_id == run_id)).scalar_one()
    if step <= top:
        return "ASSIGNED"  # another coordinator assigned it meanwhile
    if step != top + 1:
        return "WAIT"  # an earlier step must be assigned first
    more = more_can_come(conn, run_id)
    ids = conn.execute(
        select(S.c.id).where(S.c.run_id == run_id, S.c.sample_state == SampleState.READY,
                             S.c.step.is_(None))
        .order_by(S.c.committed_at, S.c.id).limit(size)
    ).scalars().all()
    if len(ids) < size:
        if more:
            return "WAIT"
        dropped = conn.execute(
            update(S).where(S.c.run_id == run_id, S.c.sample_state == SampleState.READY,
                            S.c.step.is_(None))
            .values(sample_state=SampleState.DROPPED,
                    reason=f"end of data: {len(ids)} samples cannot fill a step of {size}")
        ).rowcount
        conn.execute(update(RUNS).where(RUNS.c.run_id == run_id, RUNS.c.final_step.is_(None))
                     .values(final_step=step - 1, dropped_tail=dropped))
        return "END"
    conn.execute(insert(STEPS).values(run_id=run_id, step=step, size=size, assigned_at=now))
    conn.execute(
        update(S).where(S.c.id == bindparam("_id"))
        .values(sample_state=SampleState.ASSIGNED, step=step, slot=bindparam("_slot")),
        [{"_id": i, "_slot": slot} for slot, i in enumerate(ids)],
    )
    return "ASSIGNED"


def refill_dead_slots(conn: Connection, run_id: str, step: int, first_slot: int,
                      end_slot: int) -> bool:
    """Give each DEAD sample in slots [first_slot, end_slot) of ``step`` a READY replacement.

    A sample that died after its step was assigned would leave its rank a short slice, which
    no trainer can train. The replacement takes the dead sample's slot; the dead sample leaves
    the step. Returns False while a slot is still DEAD (no READY sample to take). The run row
    is locked first, as in ``assign_step``, so two coordinators never hand out one sample twice.
    """
    conn.execute(select(RUNS.c.run_id).where(RUNS.c.run_id == run_id).with_for_update())
    dead = conn.execute(
        select(S.c.id, S.c.slot).where(
            S.c.run_id == run_id, S.c.step == step, S.c.sample_state == SampleState.DEAD,
            S.c.slot >= first_slot, S.c.slot < end_slot).order_by(S.c.slot)
    ).all()
    spare = conn.execute(
        select(S.c.id).where(S.c.run_id == run_id, S.c.sample_state == SampleState.READY,
                             S.c.step.is_(None))
        .order_by(S.c.committed_at, S.c.id).limit(len(dead))
    ).scalars().all()
    for (dead_id, slot), spare_id in zip(dead, spare, strict=False):
        conn.execute(update(S).where(S.c.id == dead_id).values(step=None, slot=None))
        conn.execute(update(S).where(S.c.id == spare_id).values(
            sample_state=SampleState.ASSIGNED, step=step, slot=slot))
    return len(spare) == len(dead)


def rollback_to(conn: Connection, run_id: str, checkpoint: int) -> None:
    """Undo commits after ``checkpoint``: same step composition, freed tensors recaptured."""
    conn.execute(update(STEPS).where(STEPS.c.run_id == run_id, STEPS.c.step > checkpoint)
                 .values(committed_at=None, loss=None))
    conn.execute(update(S).where(S.c.run_id == run_id, S.c.step > checkpoint,
                                 S.c.sample_state == SampleState.TRAINED)
                 .values(sample_state=SampleState.ASSIGNED))
    conn.execute(update(S).where(S.c.run_id == run_id, S.c.step > checkpoint,
                                 S.c.sample_state == SampleState.RETIRED)
                 .values(sample_state=SampleState.LOST, prompt_state=PromptState.PENDING,
                         priority=0, generation=S.c.generation + 1,
                         reason="freed before a rollback"))
    conn.execute(update(RUNS).where(RUNS.c.run_id == run_id).values(
        last_committed_step=checkpoint,
        state=case((RUNS.c.state == "COMPLETED", "ACTIVE"), else_=RUNS.c.state)))


def mark_lost(conn: Connection, row: Any, reason: str, max_deliveries: int) -> bool:
    """A sample's tensors are gone: recapture it (next generation) or, too often lost, DEAD."""
    losses = row.losses + 1
    if losses >= max_deliveries:
        conn.execute(update(S).where(S.c.id == row.id).values(
            sample_state=SampleState.DEAD, prompt_state=PromptState.DEAD, losses=losses,
            reason=f"lost {losses} times; last: {reason}"))
        return False
    conn.execute(update(S).where(S.c.id == row.id).values(
        sample_state=SampleState.LOST, prompt_state=PromptState.PENDING, losses=losses,
        priority=0 if row.step is not None else 1, generation=row.generation + 1,
        reason=reason))
    return True


def trained_refs(conn: Connection, run_id: str, first: int, last: int
                 ) -> list[common_pb2.SampleRef]:
    refs = []
    for blob in conn.execute(select(S.c.ref).where(
            S.c.run_id == run_id, S.c.step >= first, S.c.step <= last,
            S.c.sample_state == SampleState.TRAINED).order_by(S.c.step, S.c.slot)).scalars():
        ref = common_pb2.SampleRef()
        ref.ParseFromString(blob)
        refs.append(ref)
    return refs


def in_flight(conn: Connection, run_id: str) -> tuple[int, int]:
    count, nbytes = conn.execute(
        select(func.count(), func.coalesce(func.sum(S.c.nbytes), 0)).where(
            S.c.run_id == run_id, S.c.sample_state.in_(IN_FLIGHT))).one()
    return int(count), int(nbytes)


def status(conn: Connection, run: Any, cfg: run_pb2.RunConfig, now: float,
           state: int) -> cpb.RunStatus:
    st = cpb.RunStatus(
        run_id=run.run_id, state=state, last_committed_step=run.last_committed_step,
        last_checkpoint_step=run.last_checkpoint_step,
        last_checkpoint_uri=run.last_checkpoint_uri, last_step_loss=run.last_step_loss,
        throttled=bool(run.throttled), fingerprint=run.fingerprint,
    )
    for name in PromptState.ALL:
        st.prompts[name] = 0
    for name in SampleState.ALL:
        st.samples[name] = 0
    for ps, n in conn.execute(select(S.c.prompt_state, func.count()).where(
            S.c.run_id == run.run_id).group_by(S.c.prompt_state)):
        st.prompts[ps] = n
    for ss, n in conn.execute(select(S.c.sample_state, func.count()).where(
            S.c.run_id == run.run_id, S.c.sample_state.is_not(None)).group_by(S.c.sample_state)):
        st.samples[ss] = n
    _, st.bytes_in_flight = in_flight(conn, run.run_id)
    window = max(1.0, min(60.0, now - run.created_at))
    recent = conn.execute(select(func.count()).select_from(S).where(
        S.c.run_id == run.run_id, S.c.committed_at >= now - window)).scalar_one()
    st.samples_committed_per_second = recent / window
    steps = conn.execute(select(func.count()).select_from(STEPS).where(
        STEPS.c.run_id == run.run_id, STEPS.c.committed_at >= now - window)).scalar_one()
    st.steps_committed_per_second = steps / window
    size = cfg.step.world_size * cfg.step.micro_batch * cfg.step.accumulation
    if run.final_step is not None:
        st.total_steps_estimate = run.final_step
    else:
        usable = run.num_prompts * cfg.epochs - st.samples[SampleState.DEAD]
        st.total_steps_estimate = usable // size
    leases = dict(conn.execute(select(S.c.lease_session, func.count()).where(
        S.c.run_id == run.run_id, S.c.prompt_state == PromptState.LEASED)
        .group_by(S.c.lease_session)).all())
    for row in conn.execute(select(SESSIONS).where(
            SESSIONS.c.run_id == run.run_id, SESSIONS.c.state == "ACTIVE")
            .order_by(SESSIONS.c.created_at)):
        w = st.workers.add(
            session_id=row.session_id, identity=row.identity,
            role=common_pb2.WORKER_ROLE_PRODUCER if row.role == "PRODUCER"
            else common_pb2.WORKER_ROLE_TRAINER,
            active_leases=leases.get(row.session_id, 0))
        w.last_heartbeat.FromNanoseconds(int(row.last_heartbeat * 1e9))
    return st
