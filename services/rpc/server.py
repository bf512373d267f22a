"""Server bootstrap shared by every role: health, reflection, auth, error mapping, shutdown.

``create_server`` builds and binds a server but does not block, so tests bind port 0 and read the
port back; ``serve_until_signalled`` is what entry points call.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.errors import DraftflowError
from services.logs import event

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_SERVICE = reflection.SERVICE_NAME
OPEN_METHODS = frozenset({f"/{HEALTH_SERVICE}/Check"})
"""What a server with a token answers without one: health ``Check``, a short unary call, so
probes (``draftflow health``, compose healthchecks) need no secret. Health ``Watch`` and server
reflection are streams that hold a server thread for as long as the client keeps them open, so
they need the token like everything else: otherwise ~max_workers idle unauthenticated streams
would pin every thread and starve authenticated work (grpcurl sends ``-H`` headers on its
reflection requests too)."""
REASON_KEY = "draftflow-reason"
"""Trailing metadata key carrying ``DraftflowError.reason``."""


@dataclass
class ServerConfig:
    """How a role's gRPC server listens."""

    listen: str = "127.0.0.1:0"
    """HOST:PORT to bind; port 0 picks a free port."""
    auth_token: str | None = None
    """Bearer token every call must carry, except health ``Check`` (see ``OPEN_METHODS``)."""
    insecure: bool = False
    """Allow binding beyond loopback without a token. Only for private networks."""
    tls_cert: str | None = None
    """PEM certificate file; with tls_key, serve TLS."""
    tls_key: str | None = None
    max_workers: int = 32
    max_message_bytes: int = MAX_MESSAGE_BYTES
    """Requests larger than this are rejected with RESOURCE_EXHAUSTED."""
    grace_seconds: float = 5.0
    """In-flight calls get this long to finish on shutdown."""
    extra_interceptors: list[grpc.ServerInterceptor] = field(default_factory=list)
    translate_error: Callable[[Exception], DraftflowError | None] | None = None
    """Turns a dependency's exception (a database driver's) into the error the client sees,
    once, here at the boundary; None (or a None answer) leaves the exception unhandled."""


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _wrap(handler: grpc.RpcMethodHandler, guard: Callable[[Any, grpc.ServicerContext], None],
          translate: Callable[[Exception], DraftflowError | None] | None = None,
          ) -> grpc.RpcMethodHandler:
    """Return ``handler`` with ``guard(request, context)`` run first, for every kind of call
    (``request`` is None for client-streaming calls, whose guard runs before the first read).

    ``guard`` and the handler may raise ``DraftflowError``; it becomes the call's status. Any
    other exception ``translate`` maps to one does too; the rest propagate (UNKNOWN).
    """

    def fail(context: grpc.ServicerContext, exc: Exception) -> None:
        err = exc if isinstance(exc, DraftflowError) else (
            translate(exc) if translate is not None else None)
        if err is None:
            raise exc
        _abort(context, err)

    if handler.unary_unary:
        inner_uu = handler.unary_unary

        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                guard(request, context)
                return inner_uu(request, context)
            except Exception as exc:
                fail(context, exc)

        return handler._replace(unary_unary=unary_unary)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterable[Any]:
            try:
                guard(request, context)
                yield from inner_us(request, context)
            except Exception as exc:
                fail(context, exc)

        return handler._replace(unary_stream=unary_stream)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        def stream_unary(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            try:
                guard(None, context)
                return inner_su(requests, context)
            except Exception as exc:
                fail(context, exc)

        return handler._replace(stream_unary=stream_unary)
    if handler.stream_stream:  # server reflection is one
        inner_ss = handler.stream_stream

        def stream_stream(requests: Iterator[Any], context: grpc.ServicerContext
                          ) -> Iterable[Any]:
            try:
                guard(None, context)
                yield from inner_ss(requests, context)
            except Exception as exc:
                fail(context, exc)

        return handler._replace(stream_stream=stream_stream)
    raise TypeError(f"unknown gRPC handler kind: {handler!r}")


class Unauthenticated(DraftflowError):
    code = grpc.StatusCode.UNAUTHENTICATED


class AuthInterceptor(grpc.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` on every method except ``OPEN_METHODS``.

    A refused call ends before the handler runs, streams included, so an unauthenticated
    client holds no server thread for longer than the refusal takes."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method in OPEN_METHODS:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, self._expected):
            return handler

        def refuse(request: Any, context: grpc.ServicerContext) -> None:
            raise Unauthenticated(
                "missing or wrong bearer token: pass --token or set DRAFTFLOW_TOKEN"
            )

        return _wrap(handler, refuse)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turn ``DraftflowError`` raised by a servicer into its gRPC status, with the message;
    other exceptions go through ``translate`` (see ``ServerConfig.translate_error``)."""

    def __init__(self, translate: Callable[[Exception], DraftflowError | None] | None = None
                 ) -> None:
        self._translate = translate

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return _wrap(handler, lambda request, context: None, self._translate)


def _abort(context: grpc.ServicerContext, exc: DraftflowError) -> None:
    log.info("request refused: %s", exc, extra=event("rpc_refused", code=exc.code.name,
                                                       reason=exc.reason))
    if exc.reason:
        context.set_trailing_metadata(((REASON_KEY, exc.reason),))
    context.abort(exc.code, str(exc))


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: Sequence[str]

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, then let in-flight calls finish for ``grace`` seconds."""
        self.set_serving(False)
        self.server.stop(grace).wait()


def create_server(
    config: ServerConfig,
    register: Callable[[grpc.Server], Sequence[str]],
) -> RunningServer:
    """Build, bind and start a server. ``register`` adds servicers and returns their full names."""
    if not is_loopback(config.listen) and not config.auth_token and not config.insecure:
        raise ValueError(
            f"refusing to listen on {config.listen} without authentication: pass --token "
            "(or DRAFTFLOW_TOKEN), or --insecure on a private network"
        )
    interceptors: list[grpc.ServerInterceptor] = []
    if config.auth_token:
        interceptors.append(AuthInterceptor(config.auth_token))
    interceptors.append(ErrorInterceptor(config.translate_error))
    interceptors.extend(config.extra_interceptors)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers),
        interceptors=interceptors,
        options=options,
    )
    names = list(register(server))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, HEALTH_SERVICE, REFLECTION_SERVICE], server)
    if config.tls_cert and config.tls_key:
        with open(config.tls_key, "rb") as k, open(config.tls_cert, "rb") as c:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        port = server.add_secure_port(config.listen, creds)
    else:
        port = server.add_insecure_port(config.listen)
    if port == 0:
        raise OSError(f"could not bind {config.listen}: is the port in use?")
    server.start()
    running = RunningServer(server, port, health_servicer, names)
    running.set_serving(True)
    return running


def wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("signal received, shutting down", extra=event("shutdown"))


def serve_until_signalled(running: RunningServer, grace: float = 5.0,
                          on_stop: Callable[[], None] | None = None) -> None:
    """Block until SIGTERM or SIGINT, then report NOT_SERVING and stop gracefully."""
    wait_for_signal()
    if on_stop is not None:
        on_stop()
    running.stop(grace)
