"""A run's history: the metrics of each committed step, kept in ``step_metrics``.

Size is bounded for long runs: every step up to ``KEEP_EVERY_STEP_UP_TO`` is kept; after that a
step is kept when it is a multiple of a stride that doubles each time the step count doubles
(2 up to 20,000, 4 up to 40,000, ...). A run of a million steps keeps about 45,000 rows, and
every stretch of the run keeps at least 5,000 points.

A step committed again after a rollback replaces its row (the rollback deletes the rows after
the checkpoint), so ``GetRunHistory`` returns each committed step once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from sqlalchemy import Connection, delete, insert, select

from coordinator.schema import StepMetricsRow
from services.api import coordinator_pb2 as cpb
from services.errors import InvalidArgument

HISTORY = StepMetricsRow.__table__

KEEP_EVERY_STEP_UP_TO = 10_000
MAX_METRICS = 256
MAX_NAME_CHARS = 64
DEFAULT_PAGE_SIZE = 1_000
MAX_PAGE_SIZE = 10_000


def kept(step: int) -> bool:
    """Whether ``step`` gets a history row under the thinning policy above."""
    if step <= KEEP_EVERY_STEP_UP_TO:
        return True
    stride = 2 ** math.ceil(math.log2(step / KEEP_EVERY_STEP_UP_TO))
    return step % stride == 0


def metric_names(names: Sequence[str], field: str, max_names: int = MAX_METRICS) -> None:
    if len(names) > max_names:
        raise InvalidArgument(f"{field}: {len(names)} metrics, at most {max_names}")
    for name in names:
        if not name or len(name) > MAX_NAME_CHARS:
            raise InvalidArgument(
                f"{field}: metric name {name!r} must have 1 to {MAX_NAME_CHARS} characters")


def record(conn: Connection, run_id: str, step: int, now: float,
           metrics: Mapping[str, float]) -> None:
    """Store (or replace) the history row of a committed step, if the policy keeps it."""
    if not kept(step):
        return
    blob = cpb.StepRecord(metrics=dict(metrics)).SerializeToString(deterministic=True)
    conn.execute(delete(HISTORY).where(HISTORY.c.run_id == run_id, HISTORY.c.step == step))
    conn.execute(insert(HISTORY).values(run_id=run_id, step=step, committed_at=now,
                                        metrics=blob))


def forget_after(conn: Connection, run_id: str, step: int) -> None:
    """Drop the rows of steps after ``step`` (rolled back; they are recorded again on commit)."""
    conn.execute(delete(HISTORY).where(HISTORY.c.run_id == run_id, HISTORY.c.step > step))


def forget_run(conn: Connection, run_id: str) -> None:
    conn.execute(delete(HISTORY).where(HISTORY.c.run_id == run_id))


def parse_request(req: cpb.GetRunHistoryRequest) -> tuple[int, int | None, int]:
    """Validate the range, filter and paging of a request: (first step, last step, page size)."""
    if req.from_step < 0:
        raise InvalidArgument(f"from_step: must be >= 0, got {req.from_step}")
    if req.to_step < 0:
        raise InvalidArgument(f"to_step: must be >= 0 (0: no bound), got {req.to_step}")
    if req.to_step and req.to_step < req.from_step:
        raise InvalidArgument(
            f"to_step: {req.to_step} is before from_step {req.from_step}")
    if not 0 <= req.page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(
            f"page_size: must be in [0, {MAX_PAGE_SIZE}] (0: {DEFAULT_PAGE_SIZE}), "
            f"got {req.page_size}")
    metric_names(req.metric_names, "metric_names")
    first = max(req.from_step, 1)
    if req.page_token:
        if not req.page_token.isdigit() or int(req.page_token) < first:
            raise InvalidArgument(
                f"page_token: {req.page_token!r} is not a next_page_token of this range")
        first = int(req.page_token)
    return first, (req.to_step or None), (req.page_size or DEFAULT_PAGE_SIZE)


def page(conn: Connection, run_id: str, req: cpb.GetRunHistoryRequest
         ) -> cpb.GetRunHistoryResponse:
    """One page of the run's history, in step order."""
    first, last, size = parse_request(req)
    stmt = select(HISTORY.c.step, HISTORY.c.committed_at, HISTORY.c.metrics).where(
        HISTORY.c.run_id == run_id, HISTORY.c.step >= first)
    if last is not None:
        stmt = stmt.where(HISTORY.c.step <= last)
    rows = conn.execute(stmt.order_by(HISTORY.c.step).limit(size + 1)).all()
    wanted = set(req.metric_names)
    resp = cpb.GetRunHistoryResponse()
    for row in rows[:size]:
        stored = cpb.StepRecord.FromString(row.metrics)
        rec = resp.records.add(step=row.step)
        rec.committed_at.FromNanoseconds(int(row.committed_at * 1e9))
        for name, value in stored.metrics.items():
            if not wanted or name in wanted:
                rec.metrics[name] = value
    if len(rows) > size:
        resp.next_page_token = str(rows[size].step)
    return resp
