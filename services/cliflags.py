"""Command-line flags every worker role shares, each with its environment variable.

One definition per flag keeps `--help` identical across roles and the env-var names in one
place (docs/multinode.md lists them).
"""

from __future__ import annotations

import argparse
import os

DEFAULT_STORE = "mooncake://127.0.0.1:50061"


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def add_worker_flags(p: argparse.ArgumentParser, *, run_aliases: tuple[str, ...] = (),
                     run_help: str = "") -> None:
    """--coordinator, --run and --store: where a producer or trainer finds its work."""
    p.add_argument("--coordinator", required=env("DRAFTFLOW_COORDINATOR") is None,
                   default=env("DRAFTFLOW_COORDINATOR"),
                   help="coordinator HOST:PORT [$DRAFTFLOW_COORDINATOR]")
    p.add_argument("--run", *run_aliases, dest="run", required=env("DRAFTFLOW_RUN") is None,
                   default=env("DRAFTFLOW_RUN"),
                   help="run id, as given to `draftflow run create`" + run_help
                   + " [$DRAFTFLOW_RUN]")
    p.add_argument("--store", default=env("DRAFTFLOW_STORE", DEFAULT_STORE),
                   help="feature store URL: mooncake://MASTER:PORT?local=THIS_NODE_IP (see "
                   "docs/feature-store.md) or memory://NAME in one process [$DRAFTFLOW_STORE, "
                   f"default {DEFAULT_STORE}]")
    p.add_argument("--revision", default=env("DRAFTFLOW_REVISION"),
                   help="label of this node's target weights; must equal the run's "
                   "target.revision (default: trust the run) [$DRAFTFLOW_REVISION]")


def add_service_flags(p: argparse.ArgumentParser, *, role: str, port: int,
                      metrics_port: int) -> None:
    """--listen, --token, --insecure, --tls-ca and the /metrics flags of a role's own service."""
    listen_env = f"DRAFTFLOW_{role.upper()}_LISTEN"
    p.add_argument("--listen", default=env(listen_env, f"127.0.0.1:{port}"),
                   help=f"HOST:PORT of the {role}'s own gRPC service [${listen_env}, default "
                   f"127.0.0.1:{port}; port 0 picks a free one]")
    p.add_argument("--token", default=env("DRAFTFLOW_TOKEN"),
                   help=f"bearer token, sent to the coordinator and required by this {role}'s "
                   "own service [$DRAFTFLOW_TOKEN]")
    p.add_argument("--insecure", action="store_true",
                   help="serve beyond loopback without a token (private networks only)")
    p.add_argument("--tls-ca", default=env("DRAFTFLOW_TLS_CA"),
                   help="PEM CA of a coordinator that serves TLS [$DRAFTFLOW_TLS_CA]")
    p.add_argument("--metrics-port", type=int,
                   default=int(env("DRAFTFLOW_METRICS_PORT", str(metrics_port)) or metrics_port),
                   help="Prometheus /metrics port, -1 to disable [$DRAFTFLOW_METRICS_PORT, "
                   f"default {metrics_port}]")
    p.add_argument("--metrics-addr", default=env("DRAFTFLOW_METRICS_ADDR", "127.0.0.1"),
                   help="address for /metrics [$DRAFTFLOW_METRICS_ADDR, default 127.0.0.1]")
