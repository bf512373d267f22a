"""A coordinator-driven training run on one rank: register, resume, train, commit, export.

The step protocol: after each optimizer step the ranks agree (one small
all-reduce, which also carries checkpoint requests), then rank 0 commits the step and frees the
tensors the coordinator retires. Every ``checkpoint_every`` steps, and at the end, a checkpoint is
written atomically and then committed. On start the coordinator's last committed checkpoint is
loaded and the stream reopens at the step after it; the coordinator re-delivers the same steps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, InvalidStateError, wait
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import grpc
import torch
import torch.distributed as dist
from google.protobuf import json_format

from services.api import common_pb2, trainer_pb2
from services.api import coordinator_pb2 as cpb
from services.logs import event
from services.store import open_store
from trainer import STATUS_FILE
from trainer import checkpoint as ckpt
from trainer.config import TrainerConfig
from trainer.export import export_draft
from trainer.loader import CoordinatorSteps
from trainer.loop import Trainer, build_trainer
from trainer.parallel import (
    DistContext,
    Mode,
    all_reduce_sum,
    full_state,
    init_distributed,
    is_sharded,
)
from trainer.session import CoordinatorSession, aux_layer_ids, local_fingerprint
from trainer.steps import StepBundle
from trainer.tracking import TensorBoardLog

log = logging.getLogger(__name__)


@dataclass
class RunnerConfig:
    """Where a trainer rank finds its run, its data and its output."""

    coordinator: str
    """Coordinator address, HOST:PORT."""
    run_id: str
    """The run to train."""
    store_url: str
    """Feature store URL (``mooncake://MASTER:PORT?...`` or ``memory://NAME``)."""
    out_dir: Path
    """Checkpoints go to ``OUT/checkpoints``, the exported draft to ``OUT/final``."""
    model_path: str | None = None
    """Target directory on this node (embedding and lm_head are read); default: the run's."""
    device: str | None = None
    """cpu, cuda or cuda:N; default: this rank's GPU when there is one, else cpu."""
    parallel: Mode = "ddp"
    """Data parallelism across ranks: ddp, fsdp or none (one rank)."""
    prefetch: int = 2
    """Steps read ahead of the one being trained."""
    max_steps: int | None = None
    """Stop after this step (absolute) even if more data comes."""
    token: str | None = None
    """Bearer token for the coordinator; default $DRAFTFLOW_TOKEN."""
    tls_ca: str | None = None
    revision: str | None = None
    """This node's label of the target weights; default: trust the run's."""
    init_method: str | None = None
    """torch.distributed rendezvous; default env:// as torchrun sets it."""
    export: bool = True
    """Export the draft to ``OUT/final`` when training ends."""

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.prefetch < 1:
            raise ValueError(f"prefetch={self.prefetch}: must be >= 1")
        if self.parallel not in ("ddp", "fsdp", "none"):
            raise ValueError(f"parallel={self.parallel!r}: use ddp, fsdp or none")


@dataclass
class TrainerStatus:
    """What ``GetStatus`` and /metrics report; written by the training thread."""

    run_id: str = ""
    session_id: str = ""
    step: int = 0
    loss: float = 0.0
    accuracies: list[float] = field(default_factory=list)
    acceptance_length: float = 0.0
    majority_accuracy: float = 0.0
    """Top-1 of always guessing the most frequent next token, over the steps trained here."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Every figure the strategy reported for the last step."""
    samples_per_second: float = 0.0
    data_wait_fraction: float = 0.0
    data_wait_seconds: float = 0.0
    steps_trained: int = 0
    samples_lost: int = 0
    world_size: int = 1
    device: str = "cpu"
    last_checkpoint_step: int = 0
    done: bool = False

    def to_proto(self) -> trainer_pb2.TrainerGetStatusResponse:
        return trainer_pb2.TrainerGetStatusResponse(
            session_id=self.session_id, run_id=self.run_id, step=self.step, loss=self.loss,
            accuracies=list(self.accuracies), samples_per_second=self.samples_per_second,
            data_wait_fraction=self.data_wait_fraction,
            simulated_acceptance_length=self.acceptance_length, world_size=self.world_size,
            device=self.device, majority_accuracy=self.majority_accuracy, metrics=self.metrics)


def position_accuracies(metrics: dict[str, float]) -> list[float]:
    """The ``acc_<position>`` figures of a step, in position order."""
    positions = sorted(int(k[4:]) for k in metrics if k.startswith("acc_") and k[4:].isdigit())
    return [float(metrics[f"acc_{p}"]) for p in positions]


def checkpoint_uri(path: Path) -> str:
    return path.resolve().as_uri()


def path_from_uri(uri: str) -> Path:
    parts = urlsplit(uri)
    if parts.scheme in ("", "file"):
        return Path(unquote(parts.path) if parts.scheme else uri)
    raise ValueError(f"checkpoint uri {uri!r}: only file:// checkpoints can be loaded here")


class _Committer:
    """Runs coordinator calls of the step protocol in order, off the training thread.

    Commits, frees and checkpoint records cost round trips that the next step need not wait
    for: the stream already holds ``prefetch`` steps. The calls wait out coordinator outages
    themselves; any other failure is passed to ``on_error`` at once (the training thread may
    be waiting for a step the coordinator holds back until the commit lands) and raised on the
    next submit.
    """

    def __init__(self, on_error: Callable[[BaseException], None] | None = None) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._on_error = on_error
        self._thread = threading.Thread(target=self._loop, name="trainer-committer",
                                        daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                if self._error is None:
                    job()
            except BaseException as exc:
                self._error = exc
                log.error("coordinator call failed: %s", exc, extra=event("commit_failed"))
                if self._on_error is not None:
                    self._on_error(exc)
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self._queue.put(job)

    def flush(self) -> None:
        """Wait until every submitted call has run; raise the first failure."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=60)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


class _Interruptible:
    """A step source whose wait for the next step ``fail`` can cut short.

    The source is advanced on a helper thread while the training thread waits for either the
    bundle or a failure; a bundle is still used before the next is asked for (buffers are
    reused), so the source sees the same one-at-a-time use as without this wrapper.
    """

    _END = object()

    def __init__(self, source: CoordinatorSteps) -> None:
        self._source = source
        self._failed: Future[None] = Future()

    def fail(self, exc: BaseException) -> None:
        """Raise ``exc`` in the training thread, now if it waits for a step, else at the next."""
        with contextlib.suppress(InvalidStateError):  # the first failure is the one raised
            self._failed.set_exception(exc)

    def steps(self, from_step: int) -> Iterator[StepBundle]:
        it = self._source.steps(from_step)
        while True:
            nxt: Future[object] = Future()
            # Daemon: if a failure wins, the thread may stay blocked until the source closes.
            threading.Thread(target=self._advance, args=(it, nxt), daemon=True,
                             name="trainer-next-step").start()
            wait([nxt, self._failed], return_when=FIRST_COMPLETED)
            if self._failed.done():
                self._failed.result()
            bundle = nxt.result()
            if bundle is self._END:
                return
            yield bundle  # type: ignore[misc]

    def _advance(self, it: Iterator[StepBundle], out: Future[object]) -> None:
        try:
            out.set_result(next(it, self._END))
        except BaseException as exc:
            out.set_exception(exc)


class _Stop(Exception):
    """Raised on every rank at the same step when any rank was asked to stop."""


class CoordinatorRunner:
    """One rank of a trainer group driven by the coordinator. ``run()`` trains to the end."""

    def __init__(self, cfg: RunnerConfig, dist_ctx: DistContext | None = None) -> None:
        self.cfg = cfg
        self.dist = dist_ctx or init_distributed(cfg.device, init_method=cfg.init_method)
        rank = self.dist.rank
        identity = f"{socket.gethostname()}:{os.getpid()}:rank{rank}"
        self.session = self._open_session(identity, self._group_id())
        self.run_info = self.session.get_run()
        self.model_path = cfg.model_path or self.run_info.config.target.model_path
        if not (Path(self.model_path) / "config.json").is_file():
            raise FileNotFoundError(
                f"{self.model_path} has no config.json; pass --model-path with this node's copy "
                "of the target (a local Hugging Face model directory)")
        reg = self.session.register(local_fingerprint(self.run_info, self.model_path, cfg.revision))
        self.train_cfg = TrainerConfig.from_run(self.run_info.config)
        geo = self.train_cfg.geometry
        if geo.world_size != self.dist.world_size:
            raise ValueError(
                f"run {cfg.run_id!r} has step.world_size={geo.world_size} but "
                f"{self.dist.world_size} trainer ranks were started; start "
                f"{geo.world_size} ranks (torchrun --nproc-per-node) or create a run with "
                f"world_size={self.dist.world_size}")
        self.checkpoint_dir = cfg.out_dir / "checkpoints"
        self.store = open_store(cfg.store_url)
        self.trainer: Trainer = build_trainer(
            self.train_cfg, self.model_path, list(self.run_info.vocab_map.draft_token_ids),
            aux_layer_ids(self.run_info), dist_ctx=self.dist,
            parallel=cfg.parallel if self.dist.is_distributed else "none",
            checkpoint_dir=self.checkpoint_dir)
        self.trainer.trainer_group = self.session.trainer_group
        self.status = TrainerStatus(
            run_id=cfg.run_id, session_id=self.session.session_id,
            world_size=self.dist.world_size, device=str(self.dist.device))
        self._save_requests: list[Future[tuple[int, str]]] = []
        self._stop_requested = False
        self.stopped = False
        self.cancelled = False
        """The run was cancelled while this runner trained it (nothing was exported)."""
        self.losses: list[tuple[int, float]] = []
        """(step, loss) of every step this runner trained, in order."""
        self.timeline: list[tuple[float, float]] = []
        """(``time.perf_counter()`` at commit, seconds inside ``train_step``) of those steps."""
        self._lock = threading.Lock()
        self.source: CoordinatorSteps | None = None
        self._steps: _Interruptible | None = None
        self._committer = _Committer(on_error=self._commit_failed)
        self._tensorboard: TensorBoardLog | None = None
        self._waited = 0.0
        """Seconds spent waiting for data up to the last step (per-step data wait is the rise)."""
        self._checkpoint_uri = reg.last_checkpoint_uri
        """URI of the latest checkpoint (what SaveCheckpoint answers)."""
        self._resume(reg.last_checkpoint_step, reg.last_checkpoint_uri)

    def _open_session(self, identity: str, trainer_group: str) -> CoordinatorSession:
        """This rank's coordinator session; colocated runs reach an in-process coordinator."""
        return CoordinatorSession(self.cfg.coordinator, self.cfg.run_id, self.cfg.token,
                                  self.cfg.tls_ca, identity, trainer_group=trainer_group)

    def _group_id(self) -> str:
        """One id for every rank of this launch (rank 0's): registering it fences older groups."""
        box: list[object] = [uuid.uuid4().hex]
        if self.dist.is_distributed:
            dist.broadcast_object_list(box, src=0)
        return str(box[0])

    # -- resume -------------------------------------------------------------------------------

    def _resume(self, step: int, uri: str) -> None:
        """Load the checkpoint the coordinator names (rank 0's answer decides for every rank)."""
        if self.dist.is_distributed:
            box: list[object] = [(step, uri)]
            dist.broadcast_object_list(box, src=0)
            step, uri = box[0]  # type: ignore[misc]
        if self.dist.rank == 0:
            self._drop_abandoned(step)
        if step > 0:
            path = path_from_uri(uri)
            if not (path / ckpt.STATE_FILE).is_file():
                raise FileNotFoundError(
                    f"the coordinator's latest checkpoint (step {step}) is {uri}, which this node "
                    f"cannot read; mount the checkpoint directory at {path} or pass the --out "
                    "the run was trained with")
            self.trainer.load_checkpoint(path)
            if self.trainer.step != step:
                raise ValueError(f"{path} holds step {self.trainer.step}, the coordinator says "
                                 f"{step}; the checkpoint directory was tampered with")
        self.status.step = self.status.last_checkpoint_step = step
        if self.dist.is_distributed:
            dist.barrier()

    def _drop_abandoned(self, committed: int) -> None:
        """Checkpoints past the coordinator's latest were never committed: another lineage."""
        if not self.checkpoint_dir.is_dir():
            return
        ckpt.clean_partial(self.checkpoint_dir)
        for entry in self.checkpoint_dir.glob("step-*"):
            m = ckpt.STEP_OF.match(entry.name)
            if m is None:
                continue
            step = int(m.group(1))
            if step > committed:
                shutil.rmtree(entry, ignore_errors=True)
                log.warning("removed uncommitted checkpoint", extra=event(
                    "checkpoint_abandoned", run_id=self.cfg.run_id, step=step, path=str(entry)))

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> int:
        """Train until end of data (or ``max_steps``), checkpoint, export; return the last step."""
        geo = self.train_cfg.geometry
        strategy = self.trainer.strategy
        pin = self.dist.device.type == "cuda"
        self.source = CoordinatorSteps(
            self.session, self.store, geo, rank=self.dist.rank, prefetch=self.cfg.prefetch,
            max_length=self.run_info.config.capture.max_length, pin_memory=pin,
            feature_names=[f.name for f in strategy.features])
        self._steps = _Interruptible(self.source)
        self._started = time.perf_counter()
        self._first_step = self.trainer.step
        if self.dist.rank == 0:
            self._tensorboard = TensorBoardLog(self.cfg.out_dir, self._first_step + 1,
                                               self.cfg.run_id)
        try:
            try:
                self.trainer.run(self._steps, max_steps=self.cfg.max_steps,
                                 on_step=self._on_step, on_checkpoint=self._on_checkpoint)
            except _Stop:
                self.stopped = True
            if self.trainer.step > self.status.last_checkpoint_step:
                self._checkpoint()
            self._committer.flush()
            if self.cfg.export and not self.stopped and not self._run_cancelled():
                self._export()
        finally:
            self.session.stop_retrying()
            self._committer.close()
            self.source.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
            self.status.done = True
            self._fail_requests(RuntimeError("training ended before the checkpoint was taken"))
        if self.dist.rank == 0 and self.status.steps_trained:
            self.cfg.out_dir.mkdir(parents=True, exist_ok=True)
            (self.cfg.out_dir / STATUS_FILE).write_text(json_format.MessageToJson(
                self.status.to_proto(), preserving_proto_field_name=True))
        log.info("training finished", extra=event(
            "trainer_done", run_id=self.cfg.run_id, step=self.trainer.step,
            end_of_data=self.source.end_step is not None, dropped=self.source.dropped))
        return self.trainer.step

    def _run_cancelled(self) -> bool:
        """Whether the run was cancelled (its stream then ends early): a draft trained on part
        of the data is not exported as OUT/final. Rank 0's answer decides for every rank."""
        box: list[object] = [False]
        if self.dist.rank == 0:
            try:
                box[0] = self.session.get_run().state == cpb.RUN_STATE_CANCELLED
            except grpc.RpcError as exc:  # the data ended: export what was trained
                log.warning("could not ask whether the run was cancelled: %s", exc.code().name,
                            extra=event("run_state_unknown", run_id=self.cfg.run_id))
        if self.dist.is_distributed:
            dist.broadcast_object_list(box, src=0)
        if box[0]:
            self.cancelled = True
            log.warning("the run was cancelled: OUT/final is not exported", extra=event(
                "export_skipped", run_id=self.cfg.run_id, step=self.trainer.step))
        return bool(box[0])

    def _commit_failed(self, exc: BaseException) -> None:
        """A step protocol call failed for good: stop training now, not at the next submit."""
        if self._steps is not None:
            self._steps.fail(exc)

    def _export(self) -> None:
        """Export the draft to OUT/final on rank 0 (every rank joins the gather under FSDP)."""
        model = None
        if is_sharded(self.trainer.model):
            full, _ = full_state(self.trainer.model, self.trainer.optimizer)
            if self.dist.rank == 0:
                model = self.trainer.strategy.build_model(self.trainer.settings)
                model.load_state_dict(full)
        if self.dist.rank != 0:
            return
        out = self.cfg.out_dir / "final"
        names = export_draft(self.trainer, out, overwrite=True, model=model)
        log.info("draft exported", extra=event(
            "export", run_id=self.cfg.run_id, step=self.trainer.step, path=str(out),
            tensors=len(names)))

    def _on_step(self, step: int, metrics: dict[str, float]) -> None:
        # Agreement: every rank has applied this step before rank 0 commits it. The same
        # all-reduce tells every rank whether a checkpoint was asked for over RPC.
        with self._lock:
            asked = [1.0 if self._save_requests else 0.0, 1.0 if self._stop_requested else 0.0]
        flags = all_reduce_sum(torch.tensor(asked, device=self.dist.device), self.dist).tolist()
        if self.dist.rank == 0:
            loss = float(metrics["loss"])
            recorded = self._step_record(metrics)
            self._committer.submit(
                lambda: self._free(self.session.commit_step(step, loss, recorded)))
            if self._tensorboard is not None:
                self._tensorboard.log(step, recorded)
        self._update_status(step, metrics)
        if flags[0] > 0 and step > self.status.last_checkpoint_step:
            self._checkpoint()
        elif flags[0] > 0:
            self._committer.submit(self._answer_requests)
        if flags[1] > 0:
            raise _Stop()

    def _step_record(self, metrics: dict[str, float]) -> dict[str, float]:
        """What a step leaves in the run's history: the strategy's summary and the seconds
        this step waited for data."""
        waited = self.source.wait_seconds if self.source is not None else 0.0
        record = {k: float(v) for k, v in metrics.items()}
        record["data_wait_seconds"] = waited - self._waited
        self._waited = waited
        return record

    def stop(self) -> None:
        """Finish the current step, checkpoint and end (every rank stops at the same step)."""
        with self._lock:
            self._stop_requested = True

    def _on_checkpoint(self, step: int, path: Path) -> None:
        if self.dist.rank == 0:
            uri = checkpoint_uri(path)
            self._committer.submit(lambda: self._free(self.session.commit_checkpoint(step, uri)))
            self._checkpoint_uri = uri
        self.status.last_checkpoint_step = step
        self._committer.submit(self._answer_requests)

    def _checkpoint(self) -> None:
        path = self.trainer.save_checkpoint()
        if path is not None:
            self._on_checkpoint(self.trainer.step, path)

    def _free(self, retire: Sequence[common_pb2.SampleRef]) -> None:
        """Remove retired samples' tensors from the store, then tell the coordinator."""
        if not retire:
            return
        self.store.remove([t.key for ref in retire for t in ref.tensors])
        self.session.retire([ref.sample_id for ref in retire])

    def _update_status(self, step: int, metrics: dict[str, float]) -> None:
        s = self.status
        assert self.source is not None
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        trained = step - self._first_step
        s.step, s.loss, s.steps_trained = step, float(metrics["loss"]), trained
        self.losses.append((step, s.loss))
        self.timeline.append((time.perf_counter(), float(metrics.get("step_seconds", 0.0))))
        s.accuracies = position_accuracies(metrics)
        s.metrics = {k: float(v) for k, v in metrics.items()}
        s.acceptance_length = float(metrics.get("acceptance_length", 0.0))
        s.majority_accuracy = float(metrics.get("majority_acc", 0.0))
        s.samples_per_second = trained * self.train_cfg.geometry.per_step / elapsed
        s.data_wait_seconds = self.source.wait_seconds
        s.data_wait_fraction = self.source.wait_seconds / elapsed
        s.samples_lost = self.source.lost_reported

    # -- checkpoint requests (TrainerService.SaveCheckpoint) ----------------------------------

    def request_checkpoint(self) -> Future[tuple[int, str]]:
        """A checkpoint after the next step (or the current one's, if already taken)."""
        fut: Future[tuple[int, str]] = Future()
        with self._lock:
            if self.status.done:
                fut.set_exception(RuntimeError("training has ended"))
                return fut
            self._save_requests.append(fut)
        return fut

    def _answer_requests(self) -> None:
        step = self.status.last_checkpoint_step
        uri = self._checkpoint_uri if step else ""
        with self._lock:
            pending, self._save_requests = self._save_requests, []
        for fut in pending:
            fut.set_result((step, uri))

    def _fail_requests(self, exc: BaseException) -> None:
        with self._lock:
            pending, self._save_requests = self._save_requests, []
        for fut in pending:
            fut.set_exception(exc)

    def close(self) -> None:
        """Leave the coordinator session and close the store."""
        self._committer.close()
        if self.source is not None:
            self.source.close()
        self.session.close()
        self.store.close()
