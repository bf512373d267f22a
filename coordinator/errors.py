"""The coordinator's errors: the shared domain errors, re-exported so callers import one place."""

from services.errors import (
    AlreadyExists,
    DraftflowError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)


class CoordinatorError(DraftflowError):
    """Root of coordinator-specific failures that are not a client's fault."""


__all__ = [
    "AlreadyExists",
    "CoordinatorError",
    "DraftflowError",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "Unavailable",
]
