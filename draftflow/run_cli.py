"""``draftflow run ...`` and ``draftflow status``: the coordinator's client commands."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_COORDINATOR = "127.0.0.1:50051"


def _coordinator_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", default=os.environ.get("DRAFTFLOW_COORDINATOR",
                                                           DEFAULT_COORDINATOR),
                   help=f"coordinator HOST:PORT [$DRAFTFLOW_COORDINATOR, default "
                   f"{DEFAULT_COORDINATOR}]")
    p.add_argument("--token", default=os.environ.get("DRAFTFLOW_TOKEN"),
                   help="bearer token [$DRAFTFLOW_TOKEN]")
    p.add_argument("--tls-ca", default=os.environ.get("DRAFTFLOW_TLS_CA"),
                   help="CA certificate when the coordinator serves TLS [$DRAFTFLOW_TLS_CA]")


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="create, inspect and cancel runs",
                         description="Create, inspect and cancel runs on a coordinator.")
    run_sub = run.add_subparsers(dest="run_command", metavar="ACTION", required=True)

    create = run_sub.add_parser(
        "create", help="create a run from a YAML config",
        description="Create a run: reads the config and dataset here, reads the target's "
        "config and tokenizer (not its weights) to build the vocab map, and sends it all to "
        "the coordinator. Creating the same run again is a no-op.",
        epilog="Example:\n  draftflow run create examples/tiny.yaml --coordinator 127.0.0.1:50051",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    create.add_argument("config", help="run config YAML (see examples/)")
    create.add_argument("--model-path", default=None,
                        help="read the target here instead of target.model_path (producers and "
                        "trainers still use the config's path, unless given their own "
                        "--model-path)")
    _coordinator_flags(create)
    create.set_defaults(func=_create)

    for name, helptext in (("get", "show one run's config"), ("cancel", "cancel a run")):
        p = run_sub.add_parser(name, help=helptext, description=helptext.capitalize() + ".")
        p.add_argument("run_id")
        if name == "cancel":
            p.add_argument("--reason", default="cancelled by operator")
        _coordinator_flags(p)
        p.set_defaults(func=_get if name == "get" else _cancel)
    lst = run_sub.add_parser("list", help="list runs", description="List every run.")
    _coordinator_flags(lst)
    lst.set_defaults(func=_list)

    status = sub.add_parser(
        "status", help="show a run's progress",
        description="Show a run's progress: prompts and samples by state, steps, workers, rates.",
        epilog="Examples:\n  draftflow status tiny\n  draftflow status tiny --watch\n"
        "  draftflow status tiny --json | jq .samples",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    status.add_argument("run_id")
    status.add_argument("--watch", action="store_true", help="follow until the run ends")
    status.add_argument("--interval", type=float, default=1.0,
                        help="seconds between updates with --watch (default 1)")
    status.add_argument("--json", action="store_true", help="print JSON (as grpcurl does)")
    _coordinator_flags(status)
    status.set_defaults(func=_status)


def _stub(args: argparse.Namespace) -> Any:
    from services.api import coordinator_pb2_grpc
    from services.rpc.client import open_channel

    return coordinator_pb2_grpc.CoordinatorServiceStub(
        open_channel(args.coordinator, token=args.token, tls_ca=args.tls_ca))


def _fail(exc: Any) -> int:
    import grpc

    if isinstance(exc, grpc.RpcError):
        hint = ""
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            hint = " (is the coordinator running? start one with `draftflow coordinator`)"
        print(f"error: {exc.code().name}: {exc.details()}{hint}", file=sys.stderr)
        return 1
    raise exc


def run_model_path(config_path: str | Path, model_path: str) -> str:
    """``target.model_path`` as the run records it: a relative path is made absolute against
    the config file's directory, so every role reads the same directory, whatever its own
    working directory (a node whose copy lives elsewhere passes ``--model-path``)."""
    if Path(model_path).expanduser().is_absolute():
        return model_path
    return os.path.normpath(Path(config_path).absolute().parent / model_path)


def read_dataset_lines(dataset: Path) -> list[str]:
    """The dataset's lines; a line that is not UTF-8 is refused with its number and what to do
    (the gRPC API carries text, so such a line cannot even reach the coordinator)."""
    lines = []
    for number, raw in enumerate(dataset.read_bytes().splitlines(), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise SystemExit(
                f"error: {dataset} line {number} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} "
                f"at column {exc.start + 1}); re-encode the file as UTF-8 or remove the line"
            ) from None
    return lines


def create_run_request(config_path: str | Path, model_path: str | Path | None = None) -> Any:
    """Build a ``CreateRunRequest`` from a config file, reading the target and dataset here."""
    from producer.vocab import describe_run, run_config_proto
    from services.api import coordinator_pb2 as cpb
    from services.config import load_run_config

    config_path = Path(config_path)
    cfg = load_run_config(config_path)
    dataset = cfg.dataset_path(config_path)
    if not dataset.is_file():
        raise SystemExit(f"error: dataset {dataset} does not exist (config field 'dataset')")
    lines = read_dataset_lines(dataset)
    facts = describe_run(model_path or cfg.model_path(config_path), cfg, lines)
    config = run_config_proto(cfg, facts, run_model_path(config_path, cfg.target.model_path))
    return cpb.CreateRunRequest(run_id=cfg.run_id, config=config, dataset_lines=lines,
                                vocab_map=facts.vocab_map)


STREAM_CHUNK_BYTES = 4 << 20
"""Dataset bytes per message of a streamed CreateRun: well under the 64 MiB message limit."""


def stream_parts(request: Any, chunk_bytes: int = STREAM_CHUNK_BYTES) -> Iterator[Any]:
    """``request`` (a ``CreateRunRequest``) as ``CreateRunStreamRequest`` messages: the first
    names the run, each carries at most about ``chunk_bytes`` of dataset lines, in order."""
    from services.api import coordinator_pb2 as cpb

    part = cpb.CreateRunStreamRequest(run_id=request.run_id, config=request.config,
                                      vocab_map=request.vocab_map)
    size = 0
    for line in request.dataset_lines:
        nbytes = len(line.encode()) + 8  # with the field's tag and length prefix
        if size and size + nbytes > chunk_bytes:
            yield part
            part, size = cpb.CreateRunStreamRequest(), 0
        part.dataset_lines.append(line)
        size += nbytes
    yield part


def create_run(stub: Any, request: Any, chunk_bytes: int = STREAM_CHUNK_BYTES) -> Any:
    """Create the run of ``request`` over a stream, so the dataset may exceed one message."""
    return stub.CreateRunStream(stream_parts(request, chunk_bytes))


def _create(args: argparse.Namespace) -> int:
    import grpc

    from services.config import ConfigError

    try:
        request = create_run_request(args.config, args.model_path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        resp = create_run(_stub(args), request)
    except grpc.RpcError as exc:
        return _fail(exc)
    print(f"run {resp.run.run_id}: {resp.run.num_prompts} prompts x "
          f"{resp.run.config.epochs} epochs, fingerprint {resp.run.fingerprint}")
    if resp.duplicate_prompts:
        print(f"  {resp.duplicate_prompts} duplicate prompts collapsed")
    for bad in resp.bad_rows[:10]:
        print(f"  skipped line {bad.line}: {bad.reason}")
    if len(resp.bad_rows) > 10:
        print(f"  ... and {len(resp.bad_rows) - 10} more bad rows")
    return 0


def _get(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format

    from services.api import coordinator_pb2 as cpb

    try:
        run = _stub(args).GetRun(cpb.GetRunRequest(run_id=args.run_id)).run
    except grpc.RpcError as exc:
        return _fail(exc)
    run.vocab_map.ClearField("d2t")
    run.vocab_map.ClearField("draft_token_ids")
    print(json_format.MessageToJson(run, preserving_proto_field_name=True))
    return 0


def _list(args: argparse.Namespace) -> int:
    import grpc

    from services.api import coordinator_pb2 as cpb

    try:
        runs = _stub(args).ListRuns(cpb.ListRunsRequest()).runs
    except grpc.RpcError as exc:
        return _fail(exc)
    for run in runs:
        print(f"{run.run_id}\t{cpb.RunState.Name(run.state)}\t{run.num_prompts} prompts\t"
              f"{run.fingerprint}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    import grpc

    from services.api import coordinator_pb2 as cpb

    try:
        run = _stub(args).CancelRun(cpb.CancelRunRequest(run_id=args.run_id,
                                                         reason=args.reason)).run
    except grpc.RpcError as exc:
        return _fail(exc)
    print(f"run {run.run_id}: {cpb.RunState.Name(run.state)}")
    return 0


def render_status(status: Any) -> Any:
    """A rich renderable of a ``RunStatus`` for people."""
    from rich.table import Table

    from services.api import common_pb2
    from services.api import coordinator_pb2 as cpb

    table = Table(title=f"run {status.run_id} — {cpb.RunState.Name(status.state)[10:]}",
                  show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    prompts = "  ".join(f"{k} {v}" for k, v in sorted(status.prompts.items()))
    samples = "  ".join(f"{k} {v}" for k, v in sorted(status.samples.items()))
    table.add_row("prompts", prompts)
    table.add_row("samples", samples)
    total = status.total_steps_estimate
    table.add_row("steps", f"{status.last_committed_step} / {total or '?'} committed, "
                  f"checkpoint at {status.last_checkpoint_step}, last loss "
                  f"{status.last_step_loss:.4f}")
    table.add_row("rates", f"{status.samples_committed_per_second:.1f} samples/s captured, "
                  f"{status.steps_committed_per_second:.2f} steps/s trained")
    table.add_row("in flight", f"{status.bytes_in_flight / 2**20:.1f} MiB"
                  + ("  (throttled: producers wait)" if status.throttled else ""))
    for w in status.workers:
        role = common_pb2.WorkerRole.Name(w.role)[12:].lower()
        table.add_row(role, f"{w.identity}  leases {w.active_leases}  session "
                      f"{w.session_id[:8]}")
    return table


def _status(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format
    from rich.console import Console
    from rich.live import Live

    from services.api import coordinator_pb2 as cpb

    stub = _stub(args)
    console = Console()
    try:
        if not args.watch:
            st = stub.GetRunStatus(cpb.GetRunStatusRequest(run_id=args.run_id)).status
            if args.json:
                print(json_format.MessageToJson(st, preserving_proto_field_name=True))
            else:
                console.print(render_status(st))
            return 0
        stream = stub.WatchRunStatus(cpb.WatchRunStatusRequest(
            run_id=args.run_id, interval_seconds=args.interval))
        if args.json:
            for msg in stream:
                print(json_format.MessageToJson(msg.status, preserving_proto_field_name=True,
                                                indent=None), flush=True)
            return 0
        with Live(console=console, auto_refresh=False) as live:
            for msg in stream:
                live.update(render_status(msg.status), refresh=True)
    except grpc.RpcError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return 130
    return 0
