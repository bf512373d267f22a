"""``draftflow health HOST:PORT``: ask a service's ``grpc.health.v1`` endpoint whether it serves.

Exit status 0 when the service answers SERVING, 1 otherwise, so container healthchecks and scripts
can call it directly. Health stays open under bearer-token auth, so no token is needed.
"""

from __future__ import annotations

import argparse
import os
import sys

_EXIT_SERVING = 0
_EXIT_NOT_SERVING = 1


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``health`` subcommand."""
    p = sub.add_parser(
        "health",
        help="check a DraftFlow service's gRPC health (exit 0 when SERVING)",
        description="Ask HOST:PORT's grpc.health.v1 service whether it is SERVING. "
        "Exit 0 when it is, 1 when it is not or cannot be reached.",
    )
    p.add_argument("target", metavar="HOST:PORT", help="address of the service")
    p.add_argument("--service", default="",
                   help="health of one gRPC service by full name (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0,
                   help="seconds to wait for an answer (default 3)")
    p.add_argument("--tls-ca", default=os.environ.get("DRAFTFLOW_TLS_CA"),
                   help="PEM CA file when the service serves TLS [env DRAFTFLOW_TLS_CA]")
    p.set_defaults(func=_run)


def check(target: str, service: str = "", timeout: float = 3.0,
          tls_ca: str | None = None) -> tuple[bool, str]:
    """Return (serving, what was seen) for ``target``'s health of ``service``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.rpc.client import open_channel

    with open_channel(target, token="", tls_ca=tls_ca) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def _run(args: argparse.Namespace) -> int:
    serving, seen = check(args.target, args.service, args.timeout, args.tls_ca)
    label = f"{args.target} {args.service}".rstrip()
    if serving:
        print(f"{label}: {seen}")
        return _EXIT_SERVING
    print(f"{label}: {seen}; check that the service is running and listening there",
          file=sys.stderr)
    return _EXIT_NOT_SERVING
