"""The trainer's side of the coordinator protocol: register, heartbeat, stream, commit, report.

One ``CoordinatorSession`` per rank. Every rank registers its own session (with the fingerprint
computed on this node) and streams its own slice; only rank 0 commits steps and checkpoints.

A session that expired (the coordinator was away longer than the session lifetime) is replaced
by a new registration under the same trainer group, and the call that found it expired is made
again: the coordinator kept every assigned and committed step, commits are idempotent, and the
weights in memory are those of the last step trained, so training continues where it was and
each step is still trained once. Only a newer group's registration (SUPERSEDED) ends it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from services.api import common_pb2, coordinator_pb2_grpc, run_pb2
from services.api import coordinator_pb2 as cpb
from services.config import default_aux_layers
from services.fingerprint import run_fingerprint
from services.logs import event
from services.rpc.client import open_channel
from services.rpc.retry import call_retrying
from services.rpc.server import REASON_KEY
from services.tokenizer import tokenizer_hash

log = logging.getLogger(__name__)

RECONNECT_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)
"""Waits between StreamSteps reconnects while the coordinator is UNAVAILABLE; the last repeats."""


def refusal_reason(exc: grpc.RpcError) -> str:
    """The coordinator's machine-readable reason for a refusal (``SESSION_EXPIRED``, ...)."""
    trailing = getattr(exc, "trailing_metadata", None)
    for key, value in (trailing() if trailing is not None else None) or ():
        if key == REASON_KEY:
            return str(value)
    return ""


def _expired(exc: grpc.RpcError) -> bool:
    return (exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            and refusal_reason(exc) == "SESSION_EXPIRED")


class RegistrationRefused(RuntimeError):
    """The coordinator refused this trainer: a fingerprint mismatch (this node's tokenizer or
    capture layers differ from the run's; the message has both values) or a cancelled run."""


def aux_layer_ids(run: cpb.Run) -> list[int]:
    """The capture layers of ``run`` (EAGLE3's default when the config leaves them out)."""
    ids = list(run.config.capture.aux_layer_ids)
    return ids or default_aux_layers(run.config.target.num_layers)


def local_fingerprint(run: cpb.Run, model_path: str | Path, revision: str | None = None) -> str:
    """The fingerprint of what this node would train on, from its own tokenizer.

    Computed exactly as producers compute theirs: the run's config with this node's tokenizer
    hash, capture layers and (when given) target revision, plus the run's vocab-map hash.
    """
    from transformers import AutoTokenizer

    cfg = run_pb2.RunConfig()
    cfg.CopyFrom(run.config)
    cfg.target.tokenizer_hash = tokenizer_hash(AutoTokenizer.from_pretrained(model_path))
    ids = aux_layer_ids(run)
    del cfg.capture.aux_layer_ids[:]
    cfg.capture.aux_layer_ids.extend(ids)
    if revision is not None:
        cfg.target.revision = revision
    return run_fingerprint(cfg, run.vocab_map.hash)


class CoordinatorSession:
    """A registered trainer session of one rank, with its heartbeat thread.

    ``register`` first; then ``stream`` for this rank's slices, and (rank 0) the commit calls.
    """

    def __init__(self, address: str, run_id: str, token: str | None = None,
                 tls_ca: str | None = None, identity: str = "trainer",
                 trainer_group: str = "") -> None:
        self.address, self.run_id, self.identity = address, run_id, identity
        self.trainer_group = trainer_group
        self._channel = open_channel(address, token, tls_ca)
        self.stub: Any = coordinator_pb2_grpc.CoordinatorServiceStub(self._channel)
        self.session_id = ""
        self.registration: cpb.RegisterWorkerResponse | None = None
        self.run_active = True
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._call: Any = None
        self._fingerprint = ""
        self._rejoin_lock = threading.Lock()
        self.rejoins = 0
        """Times this rank registered again after its session expired."""

    # -- registration -------------------------------------------------------------------------

    def get_run(self) -> cpb.Run:
        return self.stub.GetRun(cpb.GetRunRequest(run_id=self.run_id)).run

    def register(self, fingerprint: str) -> cpb.RegisterWorkerResponse:
        """Register as a trainer; a refusal (fingerprint, cancelled run) raises
        ``RegistrationRefused``."""
        self._fingerprint = fingerprint
        # UNAVAILABLE: the coordinator restarts, or the run is still being created.
        resp = call_retrying("RegisterWorker", self._register, self.stub.RegisterWorker,
                             give_up=self._stop.is_set, wait=self._stop.wait, logger=log,
                             run_id=self.run_id)
        interval = resp.heartbeat_interval_seconds or 1.0
        self._heartbeat = threading.Thread(target=self._beat, args=(interval,),
                                           name="trainer-heartbeat", daemon=True)
        self._heartbeat.start()
        log.info("trainer registered", extra=event(
            "trainer_registered", run_id=self.run_id, session_id=self.session_id,
            identity=self.identity, trainer_group=self.trainer_group,
            last_checkpoint_step=resp.last_checkpoint_step))
        return resp

    def _register(self, call: Any) -> cpb.RegisterWorkerResponse:
        try:
            resp = call(cpb.RegisterWorkerRequest(
                run_id=self.run_id, role=common_pb2.WORKER_ROLE_TRAINER,
                fingerprint=self._fingerprint, identity=self.identity,
                trainer_group=self.trainer_group))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise RegistrationRefused(exc.details()) from None
            raise
        self.session_id = resp.session_id
        self.registration = resp
        return resp

    def rejoin(self, expired: str) -> None:
        """Register again under the same trainer group after session ``expired`` expired.

        Every thread that finds the session expired calls this; the first registers, the rest
        find ``session_id`` already replaced. A newer group's registration since then makes
        the coordinator refuse (``RegistrationRefused``): this group is done.
        """
        with self._rejoin_lock:
            if self.session_id != expired:
                return
            call_retrying("RegisterWorker", self._register, self.stub.RegisterWorker,
                          give_up=self._stop.is_set, wait=self._stop.wait, logger=log,
                          run_id=self.run_id, session_id=expired)
            self.rejoins += 1
        log.warning("session expired, registered again in the same trainer group", extra=event(
            "trainer_rejoined", run_id=self.run_id, session_id=self.session_id,
            expired_session_id=expired, trainer_group=self.trainer_group, identity=self.identity,
            rejoins=self.rejoins))

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            sid = self.session_id
            try:
                resp = self.stub.Heartbeat(cpb.HeartbeatRequest(session_id=sid),
                                           timeout=max(interval, 1.0))
                self.run_active = resp.run_active
            except grpc.RpcError as exc:
                if _expired(exc):
                    try:
                        self.rejoin(sid)
                    except (grpc.RpcError, RegistrationRefused) as why:
                        # The training thread meets the same refusal at its next call.
                        log.warning("registering again failed: %s", why, extra=event(
                            "rejoin_failed", run_id=self.run_id, session_id=sid))
                    continue
                # A missed beat is survivable; the session only expires after several.
                log.warning("heartbeat failed: %s", exc.code().name, extra=event(
                    "heartbeat_failed", run_id=self.run_id, session_id=self.session_id))

    # -- steps --------------------------------------------------------------------------------

    def stream(self, rank: int, from_step: int, prefetch: int,
               stop: threading.Event | None = None, resume: bool = False,
               ) -> Iterator[cpb.StreamStepsResponse]:
        """This rank's step slices from ``from_step`` on, in order, until end of data.

        ``resume``: this group starts from the last checkpoint, so the coordinator rolls back
        commits after it (first request only). Reconnects (from the next undelivered step)
        while the coordinator is UNAVAILABLE.
        """
        step, failures = from_step, 0
        while stop is None or not stop.is_set():
            sid = self.session_id
            call = self._call = self.stub.StreamSteps(cpb.StreamStepsRequest(
                session_id=sid, rank=rank, from_step=step, prefetch=prefetch,
                resume=resume))
            resume = False
            try:
                for msg in call:
                    failures = 0
                    yield msg
                    if msg.end_of_data:
                        return
                    step = msg.step + 1
                return
            except grpc.RpcError as exc:
                if _expired(exc):
                    self.rejoin(sid)
                    continue
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
                if exc.code() == grpc.StatusCode.CANCELLED and (stop is None or stop.is_set()):
                    return
                wait = RECONNECT_BACKOFF_S[min(failures, len(RECONNECT_BACKOFF_S) - 1)]
                failures += 1
                log.warning("step stream interrupted (%s), reconnecting in %.1fs",
                            exc.code().name, wait, extra=event(
                                "stream_reconnect", run_id=self.run_id,
                                session_id=self.session_id, step=step))
                if stop is not None and stop.wait(wait):
                    return
                if stop is None:
                    time.sleep(wait)
            finally:
                call.cancel()

    def interrupt(self) -> None:
        """Cancel the open step stream (its iterator then ends when ``stop`` is set)."""
        if self._call is not None:
            self._call.cancel()

    def _retrying(self, name: str, call: Callable[[str], Any]) -> Any:
        """``call(session_id)``, waiting out an outage until the coordinator answers or
        ``close`` is called, and made again in a new session if this one expired meanwhile.
        Every call made this way is idempotent (a step committed twice answers OK)."""
        while True:
            sid = self.session_id
            try:
                return call_retrying(name, call, sid, give_up=self._stop.is_set,
                                     wait=self._stop.wait, logger=log, run_id=self.run_id,
                                     session_id=sid)
            except grpc.RpcError as exc:
                if not _expired(exc) or self._stop.is_set():
                    raise
                self.rejoin(sid)

    def commit_step(self, step: int, loss: float, metrics: Mapping[str, float] | None = None
                    ) -> list[common_pb2.SampleRef]:
        """Mark ``step`` trained, recording ``metrics`` in the run's history; returns the
        samples whose tensors may now be freed."""
        return list(self._retrying("CommitStep", lambda sid: self.stub.CommitStep(
            cpb.CommitStepRequest(session_id=sid, step=step, loss=loss,
                                  metrics=metrics or {}))).retire)

    def commit_checkpoint(self, step: int, uri: str) -> list[common_pb2.SampleRef]:
        """Record a durable checkpoint after ``step``; returns samples it lets us free."""
        return list(self._retrying("CommitCheckpoint", lambda sid: self.stub.CommitCheckpoint(
            cpb.CommitCheckpointRequest(session_id=sid, step=step, uri=uri))).retire)

    def report_lost(self, ref: common_pb2.SampleRef, reason: str) -> bool:
        """Tell the coordinator a sample's tensors are gone; False if it went DEAD instead."""
        return self._retrying("ReportLost", lambda sid: self.stub.ReportLost(
            cpb.ReportLostRequest(session_id=sid, sample_id=ref.sample_id,
                                  generation=ref.generation, reason=reason))).recapture

    def retire(self, sample_ids: Sequence[str]) -> int:
        """Tell the coordinator these samples' tensors are freed."""
        if not sample_ids:
            return 0
        return self._retrying("RetireSamples", lambda sid: self.stub.RetireSamples(
            cpb.RetireSamplesRequest(session_id=sid, sample_ids=list(sample_ids)))).retired

    def stop_retrying(self) -> None:
        """Make calls waiting out an outage give up (raise) now; used when training ends."""
        self._stop.set()

    def close(self) -> None:
        """Stop heartbeating and close the session (best effort) and the channel."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        if self.session_id:
            try:
                self.stub.UnregisterWorker(
                    cpb.UnregisterWorkerRequest(session_id=self.session_id), timeout=5)
            except grpc.RpcError as exc:
                log.warning("unregister failed: %s", exc.code().name, extra=event(
                    "unregister_failed", run_id=self.run_id, session_id=self.session_id))
        self._channel.close()
