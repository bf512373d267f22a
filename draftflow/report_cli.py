"""``draftflow report RUN``: write the run's history as a self-contained HTML page."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from draftflow.run_cli import _coordinator_flags


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="write a run's history as an HTML page with plots",
        description="Fetch RUN's history from the coordinator (GetRunHistory) and write one "
        "HTML file with its plots: loss, accuracy per unroll position, simulated acceptance "
        "length, learning rate, data wait. The page opens without network.",
        epilog="Example:\n  draftflow report tiny --coordinator 127.0.0.1:50051 --out tiny.html",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_id", metavar="RUN", help="the run")
    p.add_argument("--out", type=Path, default=None,
                   help="HTML file to write (default RUN-report.html)")
    _coordinator_flags(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import grpc

    from draftflow.report import write_report
    from draftflow.run_cli import _stub

    out = args.out or Path(f"{args.run_id}-report.html")
    try:
        path = write_report(_stub(args), args.run_id, out)
    except grpc.RpcError as exc:
        print(f"draftflow report: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(f"report written to {path}")
    return 0
