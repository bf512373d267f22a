"""``draftflow up``: train a draft on this machine, every role as its own process."""

from __future__ import annotations

import argparse
from pathlib import Path

from draftflow.paths import DEFAULT_CONFIG, DEFAULT_WORKDIR


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="run everything on this machine: coordinator, Mooncake, producers, trainer",
        description="Run the whole system on this machine: a Mooncake master and holder, the "
        "coordinator on SQLite, producers (HF transformers) and a trainer, each its own "
        "process. Shows capture and training progress, stops everything on Ctrl-C, and ends "
        "with a summary (the draft's top-1 accuracy per unroll position and simulated "
        "acceptance length beside chance; also WORKDIR/runs/RUN/summary.json) and the exported "
        "draft. Running it again continues the same run.",
        epilog="Examples:\n"
        "  draftflow up                            the tiny default run (about a minute on CPU)\n"
        "  draftflow up --producers 2              two producer processes\n"
        "  draftflow up --config my-run.yaml       your own run config\n"
        "  draftflow up --fresh                    forget the previous run and start over\n"
        "Watch from another terminal:\n"
        "  draftflow status tiny --watch --coordinator 127.0.0.1:PORT  (PORT in the logs)\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="run config YAML (default: examples/tiny.yaml, bundled with draftflow)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="database, logs, tiny target, checkpoints and the export (default "
                   f"{DEFAULT_WORKDIR} in the current directory)")
    p.add_argument("--producers", type=int, default=1, help="producer processes (default 1)")
    p.add_argument("--segment-mb", type=int, default=1024,
                   help="MiB the Mooncake holder contributes for features in flight "
                   "(default 1024)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--fresh", action="store_true", help="start over instead of continuing")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="stop after this many seconds (default 3600)")
    p.set_defaults(func=_up)


def _up(args: argparse.Namespace) -> int:
    from draftflow.up import UpOptions, run

    if args.producers < 1:
        raise SystemExit("draftflow up: --producers must be >= 1")
    return run(UpOptions(config=args.config, workdir=args.workdir, producers=args.producers,
                         segment_mb=args.segment_mb, fresh=args.fresh, device=args.device,
                         timeout_s=args.timeout))
