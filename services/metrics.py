"""Prometheus metrics: an RPC interceptor every server installs, and the /metrics endpoint."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

RPC_SECONDS = Histogram(
    "draftflow_rpc_seconds", "Server-side RPC latency", ["method"], registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
RPC_TOTAL = Counter(
    "draftflow_rpc_total", "RPCs by method and status code", ["method", "code"], registry=REGISTRY
)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts calls and times those that answer once (response streams are counted when they
    end)."""

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                try:
                    return inner(request, context)
                finally:
                    RPC_SECONDS.labels(method).observe(time.perf_counter() - start)
                    RPC_TOTAL.labels(method, _code(context)).inc()

            return handler._replace(unary_unary=unary)
        if handler.unary_stream:
            inner_s = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext) -> Iterable[Any]:
                try:
                    yield from inner_s(request, context)
                finally:
                    RPC_TOTAL.labels(method, _code(context)).inc()

            return handler._replace(unary_stream=stream)
        if handler.stream_unary:
            inner_su = handler.stream_unary

            def upload(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                try:
                    return inner_su(requests, context)
                finally:
                    RPC_SECONDS.labels(method).observe(time.perf_counter() - start)
                    RPC_TOTAL.labels(method, _code(context)).inc()

            return handler._replace(stream_unary=upload)
        return handler


def _code(context: grpc.ServicerContext) -> str:
    code = context.code() if hasattr(context, "code") else None
    return code.name if isinstance(code, grpc.StatusCode) else "OK"


def serve_metrics(port: int, addr: str = "127.0.0.1") -> int:
    """Serve /metrics on ``addr:port`` (0: a free port; negative: disabled); return the port."""
    if port < 0:
        return -1
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    return int(server.server_port)
