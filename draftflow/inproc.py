"""The coordinator's API in process: the servicer called directly, no socket, no serialisation.

Colocated runs (``draftflow train``) drive the very ``Coordinator`` the service runs, through its
servicer, so leasing, step assembly, commits and checkpoints are the service's own code. The stub
here has the shape of a gRPC stub (request in, response out, ``grpc.RpcError`` with the status
code and ``draftflow-reason`` metadata on refusal), so the producer's work loop and the trainer's
session use it unchanged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from coordinator.errors import DraftflowError, from_database
from coordinator.manager import Coordinator
from coordinator.servicer import CoordinatorServicer
from services.rpc.server import REASON_KEY
from trainer.session import CoordinatorSession


class InProcessRpcError(grpc.RpcError):
    """A refusal as a gRPC client would see it: code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str = "") -> None:
        super().__init__(details)
        self._code, self._details = code, details
        self._trailing = ((REASON_KEY, reason),) if reason else ()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


def _as_rpc_error(exc: Exception) -> grpc.RpcError | None:
    """What the server's error interceptor would have sent for ``exc``; None to re-raise."""
    err = exc if isinstance(exc, DraftflowError) else from_database(exc)
    if err is None:
        return None
    return InProcessRpcError(err.code, str(err), err.reason)


class _Context:
    """The part of ``grpc.ServicerContext`` the coordinator servicer reads."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def is_active(self) -> bool:
        return not self.cancelled.is_set()


class _StreamCall:
    """A server stream being iterated in process; ``cancel()`` ends it as a client's would."""

    def __init__(self, start: Callable[[_Context], Iterator[Any]]) -> None:
        self._context = _Context()
        self._start = start

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self._start(self._context)
        except Exception as exc:
            mapped = _as_rpc_error(exc)
            if mapped is None:
                raise
            raise mapped from exc
        if self._context.cancelled.is_set():
            raise InProcessRpcError(grpc.StatusCode.CANCELLED, "cancelled by the client")

    def cancel(self) -> None:
        self._context.cancelled.set()


class InProcessCoordinatorStub:
    """A ``CoordinatorServiceStub`` whose calls run the servicer in this process."""

    _STREAMS = ("StreamSteps", "WatchRunStatus")

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self._servicer = CoordinatorServicer(coordinator)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._servicer, name)
        if name in self._STREAMS:
            def stream(request: Any, timeout: float | None = None, **_: Any) -> _StreamCall:
                return _StreamCall(lambda context: method(request, context))
            return stream

        def unary(request: Any, timeout: float | None = None, **_: Any) -> Any:
            try:
                return method(request, _Context())
            except Exception as exc:
                mapped = _as_rpc_error(exc)
                if mapped is None:
                    raise
                raise mapped from exc
        return unary


class _NoChannel:
    def close(self) -> None:
        """Nothing to close: the coordinator lives in this process."""


class InProcessSession(CoordinatorSession):
    """A trainer's coordinator session over ``InProcessCoordinatorStub``."""

    def __init__(self, stub: InProcessCoordinatorStub, run_id: str, identity: str,
                 trainer_group: str) -> None:
        # The parent opens a lazy channel to the address; it is closed unused right away.
        super().__init__("127.0.0.1:1", run_id, identity=identity, trainer_group=trainer_group)
        self._channel.close()
        self._channel = _NoChannel()  # type: ignore[assignment]
        self.stub = stub
