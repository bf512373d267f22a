"""Domain errors shared by every service, and their gRPC status codes.

Each service raises these (or subclasses of them) from its domain code; one server interceptor
(`services.rpc.server`) turns them into gRPC statuses, so a servicer never builds a status by hand.
"""

from __future__ import annotations

import grpc


class DraftflowError(Exception):
    """Root of every error a DraftFlow service reports to a client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = ""
    """A stable, machine-readable cause sent as trailing metadata ``draftflow-reason`` (clients
    branch on it, never on the message); empty sends none."""


class InvalidArgument(DraftflowError):
    """The request itself is malformed; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(DraftflowError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DraftflowError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(DraftflowError):
    """Well-formed, but the state does not allow it (stale lease, out-of-order step, ...)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(DraftflowError):
    """A dependency (database, feature store) is unreachable; the client may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(DraftflowError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
