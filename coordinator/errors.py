"""The coordinator's errors: the shared domain errors, re-exported so callers import one place,
and the one translation of database driver errors into what a client may see."""

from __future__ import annotations

import logging
import uuid

from sqlalchemy import exc as sa_exc

from services.errors import (
    AlreadyExists,
    DraftflowError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.logs import event

log = logging.getLogger(__name__)


class CoordinatorError(DraftflowError):
    """Root of coordinator-specific failures that are not a client's fault."""


class DatabaseUnavailable(Unavailable):
    """The database does not answer (restart, network cut, pool exhausted); retry later."""

    reason = "DATABASE_UNAVAILABLE"


class SessionExpired(FailedPrecondition):
    """The session missed its heartbeats; the worker registers again and carries on."""

    reason = "SESSION_EXPIRED"


class SessionSuperseded(FailedPrecondition):
    """A newer trainer group registered for the run; this group must stop."""

    reason = "SESSION_SUPERSEDED"


_UNREACHABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError,
                sa_exc.DisconnectionError)


def from_database(exc: Exception) -> DraftflowError | None:
    """The error a client sees for a database driver's ``exc``; None for anything else.

    Clients see neither the driver's text nor the database's address: the full error is logged
    here with an id the message repeats. An unreachable database is UNAVAILABLE (workers wait it
    out); any other database error is INTERNAL.
    """
    if not isinstance(exc, sa_exc.SQLAlchemyError):
        return None
    error_id = uuid.uuid4().hex[:12]
    unreachable = isinstance(exc, _UNREACHABLE) or (
        isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated)
    log.error("database error %s: %s", error_id, exc, extra=event(
        "db_error", error_id=error_id, unreachable=unreachable, kind=type(exc).__name__))
    if unreachable:
        return DatabaseUnavailable(
            f"the coordinator's database is unavailable (error {error_id} in the coordinator "
            "log); retry shortly")
    return CoordinatorError(f"database error {error_id}; see the coordinator log")


__all__ = [
    "AlreadyExists",
    "CoordinatorError",
    "DatabaseUnavailable",
    "DraftflowError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "SessionExpired",
    "SessionSuperseded",
    "Unavailable",
    "from_database",
]
