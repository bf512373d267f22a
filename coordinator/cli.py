"""``draftflow coordinator``: serve the coordinator."""

from __future__ import annotations

import argparse
import os


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "coordinator",
        help="serve the coordinator (run state, leases, steps) over gRPC",
        description="Serve the coordinator: the one process that owns a run's durable state. "
        "SQLite (embedded, default) for one box; PostgreSQL for production and for several "
        "coordinator processes on one database.",
        epilog="Examples:\n"
        "  draftflow coordinator --db sqlite:///.draftflow/coordinator.db\n"
        "  DRAFTFLOW_TOKEN=s3cret draftflow coordinator --listen 0.0.0.0:50051 \\\n"
        "      --db postgresql+psycopg://postgres@db/draftflow --metrics-port 9101\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--listen", default=_env("DRAFTFLOW_LISTEN", "127.0.0.1:50051"),
                   help="HOST:PORT to serve on [$DRAFTFLOW_LISTEN, default 127.0.0.1:50051]")
    p.add_argument("--db", default=_env("DRAFTFLOW_DB", "sqlite:///.draftflow/coordinator.db"),
                   help="database URL [$DRAFTFLOW_DB, default sqlite:///.draftflow/coordinator.db]")
    p.add_argument("--token", default=_env("DRAFTFLOW_TOKEN"),
                   help="bearer token clients must send [$DRAFTFLOW_TOKEN]; required when "
                   "listening beyond loopback unless --insecure")
    p.add_argument("--insecure", action="store_true",
                   help="allow listening beyond loopback without a token (private networks only)")
    p.add_argument("--tls-cert", default=_env("DRAFTFLOW_TLS_CERT"),
                   help="PEM certificate to serve TLS [$DRAFTFLOW_TLS_CERT]")
    p.add_argument("--tls-key", default=_env("DRAFTFLOW_TLS_KEY"),
                   help="PEM private key for --tls-cert [$DRAFTFLOW_TLS_KEY]")
    p.add_argument("--metrics-port", type=int,
                   default=int(_env("DRAFTFLOW_METRICS_PORT", "9101") or 9101),
                   help="Prometheus /metrics port, -1 to disable [$DRAFTFLOW_METRICS_PORT, "
                   "default 9101]")
    p.add_argument("--metrics-addr", default=_env("DRAFTFLOW_METRICS_ADDR", "127.0.0.1"),
                   help="address for /metrics [$DRAFTFLOW_METRICS_ADDR, default 127.0.0.1]")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from coordinator.server import CoordinatorConfig, CoordinatorProcess
    from services.rpc.server import ServerConfig, wait_for_signal

    cfg = CoordinatorConfig(
        db_url=args.db,
        server=ServerConfig(listen=args.listen, auth_token=args.token, insecure=args.insecure,
                            tls_cert=args.tls_cert, tls_key=args.tls_key, max_workers=64),
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
    )
    try:
        proc = CoordinatorProcess(cfg)
    except ValueError as exc:
        raise SystemExit(f"draftflow coordinator: {exc}") from None
    print(f"coordinator listening on port {proc.port}", flush=True)
    wait_for_signal()
    proc.stop()
    return 0
