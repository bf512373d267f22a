"""``draftflow train``: capture and train in one process, the target and the draft side by side.

The pieces are the services' own: the coordinator (``Coordinator`` on SQLite, reached in process
through its servicer), the producer's work loop with the hf engine, and the trainer's
``CoordinatorRunner``; features pass between them through the in-memory feature store. The
producer's threads capture the next batches while the trainer trains (bounded by the run's
watermark), and the trainer's step stream reads what they committed. Leasing, step assembly,
commits, checkpoints, resume and export are therefore exactly those of ``draftflow up``.

Durability is the database's: by default ``WORKDIR/coordinator.db``, so a killed run resumes from
its last committed checkpoint; ``--no-control-plane`` keeps the database in a throwaway directory,
removed at the end, and a rerun starts over.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
from rich.console import Console
from rich.markup import escape

from draftflow.inproc import InProcessCoordinatorStub, InProcessSession
from draftflow.paths import DEFAULT_CONFIG, DEFAULT_WORKDIR
from draftflow.up_report import RunProgress, Summary, TrainerWatch, final_figures
from services.api import common_pb2
from services.api import coordinator_pb2 as cpb
from services.logs import event
from trainer import STATUS_FILE
from trainer.runner import CoordinatorRunner, RunnerConfig
from trainer.session import CoordinatorSession

log = logging.getLogger(__name__)

NO_CONTROL_PLANE_NOTE = (
    "no control plane: the run's state lives in a throwaway database and is removed at the "
    "end. A stopped or killed run cannot resume; running it again starts over (checkpoints "
    "already in {out} are replaced). Leave out --no-control-plane to keep the state in "
    "{db} and resume.")


@dataclass
class TrainOptions:
    """How ``draftflow train`` runs; the CLI fills it from flags."""

    config: Path = DEFAULT_CONFIG
    """Run config (the same YAML ``draftflow up`` and ``run create`` read)."""
    workdir: Path = DEFAULT_WORKDIR
    """Database, the tiny target, checkpoints and the exported draft go here."""
    control_plane: bool = True
    """Keep the run's state in ``WORKDIR/coordinator.db`` (resumable); False: throwaway."""
    fresh: bool = False
    """Forget the previous run (database, checkpoints, export) and start over."""
    device: str = "cpu"
    """Device for the target and the draft: cpu, cuda or cuda:N."""
    capture_batch: int = 8
    """Prompts leased and captured together (a producer's ``--lease-batch``)."""
    progress: bool = True
    """Show progress bars (off: log lines only)."""


class TrainError(RuntimeError):
    """``draftflow train`` cannot go on; the message says why."""


class ColocatedRunner(CoordinatorRunner):
    """The trainer's runner, with its session on the in-process coordinator."""

    def __init__(self, cfg: RunnerConfig, stub: InProcessCoordinatorStub) -> None:
        self._stub = stub
        super().__init__(cfg)

    def _open_session(self, identity: str, trainer_group: str) -> CoordinatorSession:
        return InProcessSession(self._stub, self.cfg.run_id, identity, trainer_group)


class _RunnerWatch(TrainerWatch):
    """``TrainerWatch`` reading the runner's status directly instead of over gRPC."""

    def __init__(self, runner: CoordinatorRunner) -> None:
        super().__init__(lambda: None)
        self._runner = runner

    def poll(self) -> None:
        self.record(self._runner.status.to_proto())


@dataclass
class Memory:
    """Bytes the colocated process holds for the models, reported at start."""

    target: int
    draft: int
    """Trainable draft parameters."""
    frozen_head: int
    """The target's embedding and lm_head the draft reads (a copy of the target's)."""
    optimizer: int
    """AdamW state: two values per trainable parameter."""
    device_allocated: int | None = None
    """What the accelerator reports allocated (None on CPU)."""

    def describe(self) -> str:
        mib = 1 << 20
        text = (f"memory: target {self.target / mib:.1f} MiB, draft {self.draft / mib:.1f} MiB "
                f"+ optimizer {self.optimizer / mib:.1f} MiB + frozen head "
                f"{self.frozen_head / mib:.1f} MiB; total {self.total / mib:.1f} MiB")
        if self.device_allocated is not None:
            text += f" (device reports {self.device_allocated / mib:.1f} MiB allocated)"
        return text

    @property
    def total(self) -> int:
        return self.target + self.draft + self.frozen_head + self.optimizer


def _nbytes(tensors: Any) -> int:
    """Bytes of distinct tensors (tied weights counted once)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
    return sum(seen.values())


def measure_memory(engine: Any, runner: CoordinatorRunner) -> Memory:
    import torch

    model = engine.model
    trainable = [p for p in runner.trainer.model.parameters() if p.requires_grad]
    frozen = [p for p in runner.trainer.model.parameters() if not p.requires_grad]
    target_head = runner.trainer.head
    head = _nbytes([target_head.embed, target_head.lm_head])
    device = runner.dist.device
    return Memory(
        target=_nbytes(model.parameters()) + _nbytes(model.buffers()),
        draft=_nbytes(trainable), frozen_head=head + _nbytes(frozen),
        optimizer=2 * _nbytes(trainable),
        device_allocated=(torch.cuda.memory_allocated(device) if device.type == "cuda"
                          else None))


def _lock(work: Path) -> IO[str]:
    """One ``draftflow train`` per work directory: its runs are resumed by assuming every
    producer session in the database belongs to a process that is gone. Released on exit,
    including kill -9."""
    work.mkdir(parents=True, exist_ok=True)
    handle = open(work / "train.lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise TrainError(f"another `draftflow train` is using {work}; wait for it or pass "
                         "another --workdir") from None
    return handle


def _release_stale_producers(stub: InProcessCoordinatorStub, run_id: str) -> int:
    """Give back the leases of producer sessions a killed ``draftflow train`` left behind, so
    their prompts are captured next, in their order, rather than after the leases expire."""
    status = stub.GetRunStatus(cpb.GetRunStatusRequest(run_id=run_id)).status
    released = 0
    for worker in status.workers:
        if worker.role != common_pb2.WORKER_ROLE_PRODUCER:
            continue
        try:
            released += stub.UnregisterWorker(cpb.UnregisterWorkerRequest(
                session_id=worker.session_id)).released_leases
        except grpc.RpcError:
            continue  # expired or closed meanwhile: its leases are handed on already
    if released:
        log.info("released the leases of a previous process", extra=event(
            "stale_leases_released", run_id=run_id, released=released))
    return released


def _create_run(stub: InProcessCoordinatorStub, config: Path, model_path: Path) -> cpb.Run:
    from draftflow.run_cli import create_run_request

    request = create_run_request(config, model_path)
    request.config.target.model_path = str(model_path)
    try:
        return stub.CreateRun(request).run
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
            raise TrainError(f"{exc.details()}\nthe config or dataset changed since the last "
                             "run in this work directory; start over with --fresh") from None
        raise TrainError(exc.details()) from None


class _Thread(threading.Thread):
    """A thread that keeps its target's result or exception for the joiner."""

    def __init__(self, name: str, target: Callable[[], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self._fn = target
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._fn()
        except BaseException as exc:
            self.error = exc
            log.exception("%s failed", self.name, extra=event("colocated_thread_failed",
                                                              thread_name=self.name))


def run(opts: TrainOptions) -> int:
    console = Console()
    config, work = opts.config.resolve(), opts.workdir.resolve()
    if opts.capture_batch < 1:
        console.print("[red]error:[/] --capture-batch must be >= 1")
        return 2
    try:
        lock = _lock(work)
    except TrainError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        return 1
    scratch: Path | None = None
    try:
        if opts.fresh:
            for name in ("coordinator.db", "coordinator.db-wal", "coordinator.db-shm"):
                (work / name).unlink(missing_ok=True)
            shutil.rmtree(work / "runs", ignore_errors=True)
        if opts.control_plane:
            db = work / "coordinator.db"
        else:
            shm = Path("/dev/shm")
            scratch = Path(tempfile.mkdtemp(prefix="draftflow-train-",
                                            dir=shm if shm.is_dir() else None))
            db = scratch / "coordinator.db"
        return _train(opts, config, work, db, console)
    except TrainError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        return 1
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        lock.close()


def _train(opts: TrainOptions, config: Path, work: Path, db: Path, console: Console) -> int:
    from transformers import AutoTokenizer

    from coordinator.db import make_engine, migrate
    from coordinator.manager import Coordinator
    from draftflow.up import UpError, _prepare_target
    from producer.engines.base import EngineConfig
    from producer.engines.hf import HFEngine
    from producer.worker import Producer, WorkerConfig
    from services.store import open_store

    started = time.monotonic()
    try:
        model_path = _prepare_target(config, work, console)
    except UpError as exc:
        raise TrainError(str(exc)) from None
    engine_db = make_engine(f"sqlite:///{db}")
    migrate(engine_db)
    stub = InProcessCoordinatorStub(Coordinator(engine_db))
    with console.status("creating the run (tokenizing the dataset, building the vocab map)"):
        run_obj = _create_run(stub, config, model_path)
    run_id, cfg = run_obj.run_id, run_obj.config
    out_dir = work / "runs" / run_id
    if cfg.step.world_size != 1:
        raise TrainError(
            f"run {run_id!r} has step.world_size={cfg.step.world_size}; draftflow train runs "
            "one rank (set step.world_size: 1, or train it disaggregated with draftflow up)")
    if not opts.control_plane:
        note = NO_CONTROL_PLANE_NOTE.format(out=out_dir, db=work / "coordinator.db")
        console.print(f"[yellow]{escape(note)}[/]")
        log.warning(note, extra=event("no_control_plane", run_id=run_id))
    else:
        console.print(f"run state in {db} (a stopped or killed run resumes from its last "
                      "checkpoint when run again)")
    _release_stale_producers(stub, run_id)
    console.print(f"run [bold]{run_id}[/]: {run_obj.num_prompts} prompts x {cfg.epochs} epochs, "
                  f"{cfg.draft.algorithm or 'eagle3'}, colocated on {opts.device}")

    # One store id for every process of this run: keys a killed process wrote are then
    # simply missing here (lost, captured again), as with a restarted Mooncake.
    store_url = "memory://colocated"
    store = open_store(store_url)
    with console.status("loading the target and building the draft"):
        engine = HFEngine(EngineConfig(
            model_path=str(model_path), device=opts.device,
            aux_layer_ids=tuple(cfg.capture.aux_layer_ids) or None,
            algorithm=cfg.draft.algorithm or "eagle3"))
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        identity = f"{socket.gethostname()}:{os.getpid()}"
        producer = Producer(stub, store, engine, tokenizer, run_obj, WorkerConfig(
            run_id=run_id, identity=f"{identity}:capture", lease_batch=opts.capture_batch))
        producer.register()
        runner = ColocatedRunner(RunnerConfig(
            coordinator="in-process", run_id=run_id, store_url=store_url, out_dir=out_dir,
            model_path=str(model_path), device=opts.device, parallel="none"), stub)
    memory = measure_memory(engine, runner)
    console.print(memory.describe())
    log.info("colocated run ready", extra=event(
        "colocated_ready", run_id=run_id, target_bytes=memory.target, draft_bytes=memory.draft,
        optimizer_bytes=memory.optimizer, resumed_step=runner.trainer.step))

    capture = _Thread("colocated-capture", producer.run)
    training = _Thread("colocated-train", runner.run)
    capture.start()
    training.start()
    watch = _RunnerWatch(runner)
    interrupted = False
    try:
        _follow(stub, run_id, training, capture, watch, console, opts.progress)
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted: checkpointing and stopping (run `draftflow train` "
                      "again to continue)[/]" if opts.control_plane else
                      "[yellow]interrupted: stopping (no control plane: nothing to resume)[/]")
        runner.stop()
        training.join()
    finally:
        if training.is_alive():  # capture failed: stop the trainer too
            runner.stop()
            runner.close()
            training.join(timeout=60)
        producer.drain()
        capture.join()
        runner.close()
        engine.close()
        store.close()
    for thread in (training, capture):
        if thread.error is not None:
            raise TrainError(f"{thread.name} failed: {thread.error}") from thread.error
    if interrupted:
        return 130
    status = stub.GetRunStatus(cpb.GetRunStatusRequest(run_id=run_id)).status
    if status.state != cpb.RUN_STATE_COMPLETED:
        raise TrainError(f"training ended before the run completed (state "
                         f"{cpb.RunState.Name(status.state)}, step {status.last_committed_step})")
    watch.poll()
    figures = watch.figures()
    if figures.steps_seen == 0:
        figures = final_figures(out_dir / STATUS_FILE) or figures
    summary = Summary.of(status, figures, cfg.draft.draft_vocab_size or cfg.target.vocab_size,
                         time.monotonic() - started, out_dir / "final",
                         cfg.draft.algorithm or "eagle3")
    summary.write(out_dir / "summary.json")
    trained = status.samples.get("TRAINED", 0) + status.samples.get("RETIRED", 0)
    elapsed = max(time.monotonic() - started, 1e-9)
    (out_dir / "colocated.json").write_text(json.dumps({
        "losses": [[step, loss] for step, loss in runner.losses],
        "memory": memory.__dict__, "control_plane": opts.control_plane,
        "samples_per_second": runner.status.samples_per_second,
        "data_wait_fraction": runner.status.data_wait_fraction,
        "capture_busy_fraction": producer.stats.engine_busy_s / elapsed,
        "samples_trained": trained,
    }, indent=2) + "\n")
    summary.print(console, out_dir, title="draftflow train — done")
    return 0


def _follow(stub: InProcessCoordinatorStub, run_id: str, training: _Thread, capture: _Thread,
            watch: TrainerWatch, console: Console, show: bool) -> None:
    """Progress until training ends; a capture failure stops the run."""
    with RunProgress(console, show) as progress:
        while training.is_alive():
            status = stub.GetRunStatus(cpb.GetRunStatusRequest(run_id=run_id)).status
            watch.poll()
            progress.show(status)
            if capture.error is not None:
                raise TrainError(f"capture failed: {capture.error}") from capture.error
            training.join(0.25)
