"""Calls that wait out a coordinator outage: a restart takes seconds, and the work must not die."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

import grpc

from services.logs import event

UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
"""The server is not answering now: restarting, unreachable, or it cancelled the call while
shutting down (callers cancel their own calls only when stopping, which ends the retries)."""
FIRST_WAIT_S = 0.2
MAX_WAIT_S = 5.0
"""Waits between tries: doubling from the first to the max."""


def call_retrying(
    name: str,
    method: Callable[[Any], Any],
    request: Any,
    *,
    give_up: Callable[[], bool],
    wait: Callable[[float], bool],
    logger: logging.Logger,
    codes: Collection[grpc.StatusCode] = UNAVAILABLE,
    **fields: Any,
) -> Any:
    """``method(request)``, tried again while it fails with one of ``codes``.

    Before each retry ``give_up()`` may end the retries; ``wait(seconds)`` sleeps and returns
    True to end them too. Either way the last error is raised. Each retry is logged on
    ``logger`` as action ``coordinator_retry`` with ``fields``. Only idempotent calls belong here.
    """
    delay = FIRST_WAIT_S
    while True:
        try:
            return method(request)
        except grpc.RpcError as exc:
            if exc.code() not in codes or give_up():
                raise
            logger.warning("coordinator unavailable (%s), retrying %s in %.1fs",
                           exc.code().name, name, delay, extra=event(
                               "coordinator_retry", call=name, code=exc.code().name,
                               wait_s=delay, **fields))
            if wait(delay):
                raise
            delay = min(delay * 2, MAX_WAIT_S)
