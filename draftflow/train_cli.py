"""``draftflow train``: capture and train in one process (colocated), resumable by default."""

from __future__ import annotations

import argparse
from pathlib import Path

from draftflow.paths import DEFAULT_CONFIG, DEFAULT_WORKDIR


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="capture and train in one process: target and draft together (colocated)",
        description="Train a draft with the target and the draft in this one process: the "
        "target captures the next batches while the draft trains on the last ones, and "
        "features pass in memory (no Mooncake, no other processes). The run's state (leases, "
        "steps, checkpoints) is kept by the coordinator's own code on an embedded SQLite "
        "database, WORKDIR/coordinator.db, so a stopped or killed run resumes from its last "
        "checkpoint when run again. Same run config, checkpoints and export "
        "(WORKDIR/runs/RUN/final) as draftflow up; ends with the same summary.",
        epilog="Examples:\n"
        "  draftflow train examples/tiny.yaml                    the tiny EAGLE3 run\n"
        "  draftflow train examples/tiny-dflash.yaml             a tiny DFlash run\n"
        "  draftflow train my-run.yaml --device cuda             on this machine's GPU\n"
        "  draftflow train examples/tiny.yaml --no-control-plane throwaway: no resume\n"
        "When to choose it over draftflow up: docs/colocated.md\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", type=Path, nargs="?", default=DEFAULT_CONFIG,
                   help="run config YAML (default: examples/tiny.yaml, bundled with draftflow)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="database, tiny target, checkpoints and the export (default "
                   f"{DEFAULT_WORKDIR} in the current directory)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--capture-batch", type=int, default=8,
                   help="prompts captured together, as a producer's --lease-batch (default 8)")
    p.add_argument("--no-control-plane", action="store_true",
                   help="keep the run's state in a throwaway database: nothing to resume")
    p.add_argument("--fresh", action="store_true", help="start over instead of continuing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from draftflow.train import TrainOptions, run

    return run(TrainOptions(config=args.config, workdir=args.workdir,
                            control_plane=not args.no_control_plane, fresh=args.fresh,
                            device=args.device, capture_batch=args.capture_batch,
                            progress=not args.no_progress))
