"""``draftflow up``: the whole system on one machine, each role its own process.

Order: tiny target (built once) → Mooncake master + holder → coordinator (SQLite) → run →
producers → trainer. Progress comes from the coordinator's run status; Ctrl-C stops everything
in reverse order. Running it again continues the same run from its database and checkpoints.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.markup import escape

from draftflow.paths import DEFAULT_CONFIG, DEFAULT_WORKDIR, EXAMPLES
from draftflow.report import REPORT_FILE, write_report
from draftflow.runtime_env import thread_env
from draftflow.stack import Child, Stack
from draftflow.up_report import RunProgress, Summary, TrainerWatch, final_figures
from services.api import coordinator_pb2 as cpb
from services.api import coordinator_pb2_grpc
from services.logs import event
from services.rpc.client import open_channel
from services.store.mooncake_proc import (
    MasterHandle,
    free_ports,
    master_binary,
    start_holder,
    start_master,
)
from trainer import STATUS_FILE

log = logging.getLogger(__name__)


@dataclass
class UpOptions:
    config: Path = DEFAULT_CONFIG
    """Run config; the default trains a tiny target built locally."""
    workdir: Path = DEFAULT_WORKDIR
    """Database, logs, the tiny target, checkpoints and the exported draft go here."""
    producers: int = 1
    """Producer processes."""
    segment_mb: int = 1024
    """Memory the Mooncake holder contributes for features in flight."""
    fresh: bool = False
    """Forget the previous run (database, checkpoints, export) and start over."""
    device: str = "cpu"
    """Device for the producers and the trainer."""
    timeout_s: float = 3600.0
    """Give up (and stop everything) after this long."""


class UpError(RuntimeError):
    """``draftflow up`` cannot go on; the message says why and what to look at."""


def _wait_listening(child: Child, role: str, timeout_s: float = 60.0) -> str:
    """The address a child binds on port 0, once it prints it."""
    address = _listening_address(child, role)
    deadline = time.monotonic() + timeout_s
    while (found := address()) is None:
        if not child.alive():
            raise UpError(f"{child.name} exited during start-up:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            raise UpError(f"{child.name} did not start listening; see {child.log_path}")
        time.sleep(0.1)
    return found


def _wait_healthy(target: str, child: Child, timeout_s: float = 60.0) -> None:
    stub = health_pb2_grpc.HealthStub(open_channel(target))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            raise UpError(f"{child.name} exited during start-up:\n{child.log_tail()}")
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise UpError(f"{child.name} did not become healthy at {target}; see {child.log_path}")


def _thread_env(device: str, processes: int) -> dict[str, str]:
    """Split this machine's cores among the CPU roles (``OMP_NUM_THREADS`` set wins)."""
    if device != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return {}
    return thread_env(processes)


def _preflight() -> None:
    """Check what the stack needs at run time before anything slow is built."""
    try:
        master_binary()
        import mooncake.store  # noqa: F401  (the holder's and the roles' client)
    except (FileNotFoundError, ImportError) as exc:
        raise UpError(f"Mooncake is missing ({exc}); install it with "
                      "pip install 'draftflow[mooncake]'") from None
    try:
        free_ports(4)
    except OSError as exc:
        raise UpError(f"cannot bind a free TCP port on 127.0.0.1 ({exc}); the coordinator, "
                      "Mooncake and the roles each listen on one") from None


def _target_path(config_path: Path, work: Path) -> Path:
    """Where the run's target lives for this ``up``.

    A bundled example's relative ``target.model_path`` names the work directory's tiny target
    (``../.draftflow/tiny-target`` beside ``examples/`` in a checkout), so an installed
    ``draftflow`` builds it under ``--workdir``, not inside the package.
    """
    from services.config import load_run_config

    cfg = load_run_config(config_path)
    if (config_path.resolve().parent == EXAMPLES.resolve()
            and not Path(cfg.target.model_path).is_absolute()):
        return work / Path(cfg.target.model_path).name
    return cfg.model_path(config_path).resolve()


def _prepare_target(config_path: Path, work: Path, console: Console) -> Path:
    """The target's directory; the tiny target is built there when a bundled example names it."""
    model = _target_path(config_path, work)
    if (model / "config.json").is_file():
        return model
    from services.tiny_model import EXAMPLE_TARGETS

    if model.parent != work or model.name not in EXAMPLE_TARGETS:
        raise UpError(f"target.model_path {model} has no model; point the config at a local "
                      "Hugging Face model directory")
    with console.status(f"building the tiny target model in {model} (once, about a minute)"):
        EXAMPLE_TARGETS[model.name](model)
    return model


def _listening_address(child: Child, role: str) -> Callable[[], str | None]:
    """HOST:PORT a child printed as "<role> listening on port N", once it has."""
    pattern = re.compile(rf"{role} listening on port (\d+)")
    found: list[str] = []

    def address() -> str | None:
        if not found:
            match = pattern.search(child.own_log())
            if match:
                found.append(f"127.0.0.1:{match.group(1)}")
        return found[0] if found else None

    return address


def run(opts: UpOptions) -> int:
    console = Console()
    config = opts.config.resolve()
    work = opts.workdir.resolve()
    if opts.fresh and work.exists():
        for name in ("coordinator.db", "coordinator.db-wal", "coordinator.db-shm"):
            (work / name).unlink(missing_ok=True)
        shutil.rmtree(work / "runs", ignore_errors=True)
    try:
        _preflight()
        (work / "logs").mkdir(parents=True, exist_ok=True)
        model_path = _prepare_target(config, work, console)
    except UpError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        return 1
    stack = Stack(work / "logs")
    master: MasterHandle | None = None
    holder = None
    started = time.monotonic()
    try:
        with console.status("starting Mooncake master and holder"):
            master = start_master(log_path=work / "logs" / "mooncake-master.log")
            holder = start_holder(master.address, opts.segment_mb,
                                  log_path=work / "logs" / "mooncake-holder.log")
        store_url = master.url("draftflow")
        coordinator = stack.python("coordinator", [
            "draftflow", "--log-format", "json", "coordinator", "--listen", "127.0.0.1:0",
            "--db", f"sqlite:///{work / 'coordinator.db'}", "--metrics-port", "-1"])
        with console.status("starting the coordinator"):
            target = _wait_listening(coordinator, "coordinator")
            _wait_healthy(target, coordinator)
        stub = coordinator_pb2_grpc.CoordinatorServiceStub(open_channel(target))
        with console.status("creating the run (tokenizing the dataset, building the vocab map)"):
            run_obj = _create_run(stub, config, model_path)
        run_id = run_obj.run_id
        out_dir = work / "runs" / run_id
        console.print(f"run [bold]{run_id}[/]: {run_obj.num_prompts} prompts x "
                      f"{run_obj.config.epochs} epochs; logs in {stack.log_dir}")
        console.print(f"watch it from another terminal: draftflow status {run_id} --watch "
                      f"--coordinator {target}")
        # The config's model path is relative to the config file; the roles run elsewhere.
        common = ["--coordinator", target, "--run", run_id, "--store", store_url,
                  "--metrics-port", "-1", "--model-path", str(model_path)]

        world = run_obj.config.step.world_size
        env = _thread_env(opts.device, opts.producers + world)

        # Producers stay until the run completes, to capture again what a rollback or a
        # lost tensor puts back.
        for i in range(opts.producers):
            stack.python(f"producer-{i}", ["draftflow", "--log-format", "json", "producer",
                                           *common, "--listen", "127.0.0.1:0",
                                           "--device", opts.device], env)
        # Port 0: the trainer binds a free port itself and prints it (no port race).
        trainer_args = ["draftflow", "--log-format", "json", "trainer", *common,
                        "--listen", "127.0.0.1:0", "--out", str(out_dir),
                        "--device", opts.device]
        if world > 1:
            # torchrun's parser reads `--run` as an ambiguous `--run-path`.
            trainer_args[trainer_args.index("--run")] = "--run-id"
            trainer = stack.python("trainer", ["torch.distributed.run", "--standalone",
                                               f"--nproc-per-node={world}", "-m", *trainer_args],
                                   env)
        else:
            trainer = stack.python("trainer", trainer_args, env)
        watch = TrainerWatch(_listening_address(trainer, "trainer"))
        status = _follow(stub, run_id, stack, trainer, watch, console, opts.timeout_s, started)
        watch.close()
        code = stack.wait_exit(trainer, 120.0)
        if code != 0:
            raise UpError(f"trainer exited with {code}:\n{trainer.log_tail()}")
        figures = watch.figures()
        if figures.steps_seen == 0:
            # Every step passed between two polls, or nothing was left to train: the last
            # step a trainer of this run trained, as it wrote it down.
            figures = final_figures(out_dir / STATUS_FILE) or figures
        draft_cfg = run_obj.config.draft
        summary = Summary.of(status, figures,
                             draft_cfg.draft_vocab_size or run_obj.config.target.vocab_size,
                             time.monotonic() - started, out_dir / "final",
                             draft_cfg.algorithm or "eagle3")
        summary.write(out_dir / "summary.json")
        summary.print(console, out_dir)
        _write_report(stub, run_id, out_dir / REPORT_FILE, console)
        log.debug("up finished", extra=event("up_done", run_id=run_id,
                                            steps=status.last_committed_step))
        return 0
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping every process (run `draftflow up` again "
                      "to continue)[/]")
        return 130
    except UpError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    finally:
        stack.stop_all()
        if holder is not None:
            holder.stop()
        if master is not None:
            master.stop()


def _write_report(stub: Any, run_id: str, path: Path, console: Console) -> None:
    """The run's history as an HTML page; a failure to write it is shown, and the run stands."""
    try:
        write_report(stub, run_id, path)
    except (grpc.RpcError, OSError) as exc:
        console.print(f"[yellow]report not written:[/] {escape(str(exc))}")
        log.warning("report not written", extra=event("report_failed", run_id=run_id,
                                                      error=str(exc)))
        return
    console.print(f"report: {path}")


def _create_run(stub: Any, config: Path, model_path: Path) -> cpb.Run:
    from draftflow.run_cli import create_run, create_run_request

    request = create_run_request(config, model_path)
    # The roles of this `up` read the target where it was prepared.
    request.config.target.model_path = str(model_path)
    try:
        return create_run(stub, request).run
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
            raise UpError(f"{exc.details()}\nthe config or dataset changed since the last "
                          "`draftflow up`; start over with `draftflow up --fresh`") from None
        raise


def _follow(stub: Any, run_id: str, stack: Stack, trainer: Child, watch: TrainerWatch,
            console: Console, timeout_s: float, started: float) -> cpb.RunStatus:
    with RunProgress(console) as progress:
        while True:
            status = stub.GetRunStatus(cpb.GetRunStatusRequest(run_id=run_id)).status
            if trainer.alive():
                watch.poll()
            progress.show(status)
            if status.state == cpb.RUN_STATE_COMPLETED and not trainer.alive():
                return status
            if status.state == cpb.RUN_STATE_CANCELLED:
                raise UpError("the run was cancelled")
            broken = stack.failed(expected_exits=[c.name for c in stack.children
                                                  if c.name.startswith(("producer", "trainer"))])
            if broken is not None:
                raise UpError(f"{broken.name} exited with {broken.process.returncode}; last "
                              f"lines of {broken.log_path}:\n{broken.log_tail()}")
            if not trainer.alive() and status.state != cpb.RUN_STATE_COMPLETED:
                raise UpError(f"the trainer stopped before the run completed:\n"
                              f"{trainer.log_tail()}")
            if time.monotonic() - started > timeout_s:
                raise UpError(f"not finished after {timeout_s:.0f} s; the run continues with "
                              "the next `draftflow up`")
            time.sleep(0.25)
