"""The ``draftflow`` command: one entry point, one subcommand per role.

Each role's ``cli`` module adds its own subcommands through ``register(subparsers)`` and keeps
heavy imports (torch, transformers) inside the command functions, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from draftflow import runtime_env

# Modules that contribute subcommands, in the order --help lists them.
_COMMAND_MODULES = (
    "draftflow.up_cli",
    "draftflow.train_cli",
    "draftflow.run_cli",
    "draftflow.report_cli",
    "coordinator.cli",
    "producer.cli",
    "trainer.cli",
    "draftflow.health_cli",
)

EPILOG = """\
Start here:
  draftflow up                      train a tiny EAGLE3 draft on this machine, end to end
  draftflow train CONFIG            target and draft in one process (colocated, resumable)
  draftflow status RUN --watch      follow a run
Several nodes:
  draftflow coordinator --listen 0.0.0.0:50051 --db postgresql+psycopg://...
  draftflow run create examples/tiny.yaml --coordinator HOST:50051
  draftflow producer --coordinator HOST:50051 --run RUN --engine hf
  torchrun --nproc-per-node 8 -m draftflow trainer --coordinator HOST:50051 --run-id RUN
Every flag also reads an environment variable (shown in each command's --help).
DRAFTFLOW_TOKEN_FILE names a file holding the token when DRAFTFLOW_TOKEN is not set;
DRAFTFLOW_CPU_PROCESSES=N gives each of N processes sharing the cores its share of threads.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="draftflow",
        description="Train speculative-decoding draft models online, with disaggregated "
        "producers (target model) and trainers (draft model).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text for people, json for log pipelines (default text)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before the parser: flags take their defaults from the environment.
    try:
        runtime_env.apply(os.environ)
    except runtime_env.SettingError as exc:
        print(f"draftflow: {exc}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from services import logs

    logs.configure(args.log_level, args.log_format)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
