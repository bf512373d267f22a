"""The producer's work loop: lease prompts, capture, write tensors, commit refs.

Four threads, one job each, joined by bounded queues of ``queue_batches`` batches:

* the **feeder** leases prompts and prepares them (chat template, loss mask), ahead of the engine;
* the **capture** thread (the caller of ``run()``) runs the engine; it is the one to keep busy;
* the **writer** puts each captured sample into the feature store and commits the refs, so
  writes and commits overlap the next capture;
* the **keeper** heartbeats the session and extends leases that are past half their time.

Every prompt ends in exactly one of: committed, failed (retryable or not, with a reason), or
released at unregistration. A lease that went stale under us (expired, re-leased elsewhere) is
dropped and its written keys removed; the coordinator has already handed the prompt on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from producer.dataprep import PreparedPrompt, PromptError, messages_from_conversation
from producer.dataprep import prepare_prompt as _prepare
from producer.engines.base import CaptureEngine, EngineError
from producer.features import sample_features
from producer.regenerate import Regenerated, regenerate, sample_seed
from services.api import common_pb2, run_pb2
from services.api import coordinator_pb2 as cpb
from services.fingerprint import run_fingerprint
from services.logs import event
from services.rpc.retry import UNAVAILABLE, call_retrying
from services.store.base import FeatureStore, StoreError, StoreFull
from services.tokenizer import tokenizer_hash

log = logging.getLogger(__name__)

_TRANSIENT = (*UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
"""The coordinator is not answering now (this worker's calls carry deadlines, too)."""


@dataclass(frozen=True)
class WorkerConfig:
    """How the work loop paces itself."""

    run_id: str
    """The run to produce samples for."""
    identity: str = "producer"
    """Shown in the coordinator's status (host, pid)."""
    lease_batch: int = 8
    """Prompts asked for per LeasePrompts call, and captured together."""
    queue_batches: int = 2
    """Captured batches that may wait for the writer; bounds memory, keeps the engine busy."""
    revision: str | None = None
    """This node's label of the target weights; default: trust the run's."""
    store_full_backoff_s: float = 0.2
    """First wait after ``StoreFull``; doubles up to 2 s."""
    store_full_wait_s: float | None = None
    """How long one sample waits for room before its prompt fails (retryably); default: the
    run's lease time. Leases are extended meanwhile."""
    exit_when_captured: bool = False
    """Stop once every prompt is captured. By default the producer stays until the run ends,
    since a trainer that rolls back, or a lost tensor, puts prompts back to capture."""


@dataclass
class _Item:
    """One leased prompt on its way through the loop."""

    lease: cpb.PromptLease
    expires: float  # local monotonic time the lease runs out
    prompt: PreparedPrompt | None = None
    features: dict[str, Any] | None = None
    ref: common_pb2.SampleRef | None = None
    generated: tuple[common_pb2.GeneratedTurn, ...] = ()  # the turns the target regenerated
    stored: tuple[common_pb2.TensorSpec, ...] = ()  # written by an engine that writes itself

    def handle(self) -> cpb.LeaseHandle:
        return cpb.LeaseHandle(sample_id=self.lease.sample_id, lease_token=self.lease.lease_token)


@dataclass
class ProducerStats:
    """Counters for GetStatus and metrics; read without a lock (single writers, plain ints)."""

    started: float = field(default_factory=time.monotonic)
    samples_committed: int = 0
    tokens_committed: int = 0
    prompts_failed: int = 0
    leases_lost: int = 0
    engine_busy_s: float = 0.0
    """Seconds the engine was busy, generating or capturing."""
    in_flight: int = 0
    generate_busy_s: float = 0.0
    """Seconds of ``engine_busy_s`` spent regenerating responses."""
    turns_generated: int = 0
    tokens_generated: int = 0
    turns_truncated: int = 0
    """Regenerated turns that hit max_new_tokens (or the capture length)."""
    samples_dropped_truncated: int = 0
    """Samples failed for a truncated turn (regenerate.on_truncation: drop)."""


NO_TRAINED_PAIR = ("no two consecutive trained tokens after truncation: a DFlash-family draft "
                   "needs an anchor token and the token after it to be trained on")


def _has_trained_pair(prompt: PreparedPrompt) -> bool:
    mask = prompt.loss_mask.bool()
    return bool((mask[:-1] & mask[1:]).any())


class RegistrationRefused(RuntimeError):
    """The coordinator refused this producer: a fingerprint mismatch (the message has both
    values) or a run that is cancelled."""


def local_fingerprint(run: cpb.Run, tokenizer: Any, aux_layer_ids: Sequence[int],
                      revision: str | None = None) -> str:
    """The fingerprint of what this node would capture, from its own tokenizer and layers."""
    cfg = run_pb2.RunConfig()
    cfg.CopyFrom(run.config)
    cfg.target.tokenizer_hash = tokenizer_hash(tokenizer)
    del cfg.capture.aux_layer_ids[:]
    cfg.capture.aux_layer_ids.extend(aux_layer_ids)
    if revision is not None:
        cfg.target.revision = revision
    return run_fingerprint(cfg, run.vocab_map.hash)


class Producer:
    """Runs the work loop for one run until the data is exhausted or ``drain()`` is called."""

    def __init__(self, stub: Any, store: FeatureStore, engine: CaptureEngine, tokenizer: Any,
                 run: cpb.Run, config: WorkerConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stub = stub
        self._store = store
        self._engine = engine
        self._tokenizer = tokenizer
        self._run = run
        self._cfg = config
        self._clock = clock
        self.stats = ProducerStats()
        self.run_id = config.run_id
        self.session_id = ""
        self._lease_s = run.config.lease.lease_seconds
        self._heartbeat_s = run.config.lease.heartbeat_seconds
        self._max_length = run.config.capture.max_length
        self._template = run.config.capture.chat_template or None
        self._regenerate = (run.config.regenerate if run.config.HasField("regenerate")
                            else None)
        if self._regenerate is not None and not engine.can_generate:
            raise EngineError(f"run {run.run_id!r} regenerates its responses, which the "
                              f"{engine.name} engine cannot do; run the producer with --engine hf")
        self._draining = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: dict[str, _Item] = {}
        # feeder -> capture -> writer; bounded, so a slow stage holds the others back.
        self._prepared: queue.Queue[list[_Item] | None] = queue.Queue(maxsize=config.queue_batches)
        self._queue: queue.Queue[list[_Item] | None] = queue.Queue(maxsize=config.queue_batches)
        self._error: BaseException | None = None

    # ----------------------------------------------------------------- public

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def drain(self) -> None:
        """Stop leasing; what is in flight is captured, written and committed, then ``run`` ends."""
        if not self._draining.is_set():
            log.info("draining", extra=event("producer_drain", run_id=self._cfg.run_id,
                                             session_id=self.session_id))
        self._draining.set()

    def register(self) -> cpb.RegisterWorkerResponse:
        """Register with the fingerprint of this node's tokenizer and capture layers."""
        fp = local_fingerprint(self._run, self._tokenizer, self._engine.aux_layer_ids,
                               self._cfg.revision)
        try:
            resp = self._call("RegisterWorker", self._stub.RegisterWorker,
                              cpb.RegisterWorkerRequest(
                                  run_id=self._cfg.run_id, role=common_pb2.WORKER_ROLE_PRODUCER,
                                  fingerprint=fp, identity=self._cfg.identity))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise RegistrationRefused(exc.details()) from None
            raise
        self.session_id = resp.session_id
        if resp.heartbeat_interval_seconds > 0:
            self._heartbeat_s = resp.heartbeat_interval_seconds
        log.info("producer registered", extra=event(
            "producer_registered", run_id=self._cfg.run_id, session_id=self.session_id,
            fingerprint=fp, engine=self._engine.name, device=str(self._engine.device)))
        return resp

    def run(self) -> ProducerStats:
        """Register (if not yet), produce until exhausted or drained, then unregister."""
        if not self.session_id:
            self.register()
        threads = [
            threading.Thread(target=self._guarded, args=(self._feeder_loop, self._prepared),
                             name="producer-feeder", daemon=True),
            threading.Thread(target=self._guarded, args=(self._writer_loop, None),
                             name="producer-writer", daemon=True),
        ]
        keeper = threading.Thread(target=self._keeper_loop, name="producer-keeper", daemon=True)
        for t in [*threads, keeper]:
            t.start()
        feeder_done = False
        try:
            feeder_done = self._capture_loop()
        finally:
            self._draining.set()
            # If capture stopped early, unblock the feeder; its leases go back at unregistration.
            while not feeder_done:
                feeder_done = self._prepared.get() is None
            self._queue.put(None)
            for t in threads:
                t.join()
            self._stopped.set()
            keeper.join()
            self._unregister()
        if self._error is not None:
            raise self._error
        return self.stats

    def _guarded(self, loop: Callable[[], None], done: queue.Queue | None) -> None:
        """Run a stage; its failure stops the whole loop and is re-raised by ``run``."""
        try:
            loop()
        except BaseException as exc:
            if self._error is None:
                self._error = exc
            self._draining.set()
            log.exception("producer stage failed", extra=event(
                "producer_stage_failed", run_id=self._cfg.run_id,
                stage=threading.current_thread().name))
        finally:
            if done is not None:
                done.put(None)

    def _call(self, name: str, method: Callable[[Any], Any], request: Any,
              until: Callable[[], bool] | None = None) -> Any:
        """Call the coordinator, waiting out outages (a restart takes seconds): retry
        UNAVAILABLE / DEADLINE_EXCEEDED with capped backoff. Without limit while producing;
        while draining, for at most the lease time (the leases are gone after that anyway);
        never once the loop has stopped or ``until()`` says to give up."""
        drain_deadline: list[float] = []

        def give_up() -> bool:
            if self._stopped.is_set() or (until is not None and until()):
                return True
            if not self._draining.is_set():
                return False
            if not drain_deadline:
                drain_deadline.append(self._clock() + self._lease_s)
            return self._clock() >= drain_deadline[0]

        return call_retrying(name, method, request, give_up=give_up, wait=self._stopped.wait,
                             logger=log, codes=_TRANSIENT, run_id=self._cfg.run_id,
                             session_id=self.session_id)

    def _rejoin(self, why: str) -> None:
        """Our session expired (missed heartbeats): its leases went back; start a new one."""
        log.warning("session lost, registering again: %s", why, extra=event(
            "session_lost", run_id=self._cfg.run_id, session_id=self.session_id))
        with self._lock:
            stale = list(self._in_flight.values())
        self._lost(stale, why)
        self.register()

    # ---------------------------------------------------------- capture side

    def _feeder_loop(self) -> None:
        """Lease and prepare batches ahead of the engine, so it never waits on an RPC."""
        idle = False  # every prompt captured, run still going: logged once per idle spell
        while not self._draining.is_set():
            try:
                resp = self._call("LeasePrompts", self._stub.LeasePrompts,
                                  cpb.LeasePromptsRequest(session_id=self.session_id,
                                                          max_prompts=self._cfg.lease_batch),
                                  until=self._draining.is_set)
            except grpc.RpcError as exc:
                if exc.code() in _TRANSIENT and self._draining.is_set():
                    return  # drained during an outage: nothing more to lease
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                self._rejoin(exc.details())
                continue
            if not resp.leases:
                if resp.run_ended or (resp.exhausted and self._cfg.exit_when_captured):
                    log.info("no prompts left", extra=event(
                        "producer_exhausted", run_id=self._cfg.run_id, run_ended=resp.run_ended))
                    return
                if resp.exhausted and not idle:
                    log.info("every prompt is captured; waiting for recaptures until the run "
                             "ends", extra=event("producer_idle", run_id=self._cfg.run_id))
                idle = resp.exhausted
                self._draining.wait(max(resp.retry_after_seconds, 0.05))
                continue
            idle = False
            now = self._clock()
            items = [_Item(lease=le, expires=now + self._lease_s) for le in resp.leases]
            with self._lock:
                self._in_flight.update((it.lease.sample_id, it) for it in items)
                self.stats.in_flight = len(self._in_flight)
            ready = self._prepare(items)
            if ready:
                self._prepared.put(ready)

    def _capture_loop(self) -> bool:
        """Capture prepared batches until the feeder is done (then True); drained batches are
        still ours, so they are captured too."""
        while (items := self._prepared.get()) is not None:
            if self._error is None and self._regenerate is not None:
                items = self._regenerate_items(items)
            if not items:
                continue
            if self._error is None:
                self._capture(items)
            else:
                self._fail(items, f"producer stopping: {self._error}", retryable=True)
        return True

    def _prepare(self, items: list[_Item]) -> list[_Item]:
        ready: list[_Item] = []
        bad: dict[str, list[_Item]] = {}
        if self._regenerate is not None:
            return items  # the capture thread regenerates the answers, then prepares
        for it in items:
            try:
                it.prompt = _prepare(self._tokenizer,
                                     messages_from_conversation(it.lease.conversation),
                                     self._max_length, self._template)
                if self._engine.plan.needs_supervised_pair and not _has_trained_pair(it.prompt):
                    raise PromptError(NO_TRAINED_PAIR)
                ready.append(it)
            except PromptError as exc:
                bad.setdefault(exc.reason, []).append(it)
        for reason, group in bad.items():
            self._fail(group, reason, retryable=False)
        return ready

    def _regenerate_items(self, items: list[_Item]) -> list[_Item]:
        """Regenerate each prompt's assistant turns with the engine (on the capture thread: the
        engine runs one thing at a time); prompts that cannot be regenerated fail."""
        settings = self._regenerate
        assert settings is not None
        ready: list[_Item] = []
        bad: dict[tuple[str, bool], list[_Item]] = {}
        start = time.monotonic()
        try:
            for it in items:
                lease = it.lease

                def generate(ids: list[int], n: int, seed: int) -> list[int]:
                    return self._engine.generate(ids, settings=settings, max_new_tokens=n,
                                                 seed=seed)
                try:
                    out: Regenerated = regenerate(
                        generate, self._tokenizer,
                        messages_from_conversation(lease.conversation), settings=settings,
                        max_length=self._max_length,
                        seed=sample_seed(settings, lease.prompt_id, lease.epoch),
                        stop_token_ids=self._engine.stop_token_ids,
                        chat_template=self._template, given=lease.generated)
                    if not out.reused:
                        self.stats.turns_generated += len(out.turns)
                        self.stats.tokens_generated += out.tokens_generated
                        self.stats.turns_truncated += out.truncated_turns
                    if out.truncated_turns and settings.on_truncation == "drop":
                        self.stats.samples_dropped_truncated += 1
                        raise PromptError(
                            f"{out.truncated_turns} regenerated turn(s) hit max_new_tokens="
                            f"{settings.max_new_tokens} (regenerate.on_truncation: drop)")
                    if (self._engine.plan.needs_supervised_pair
                            and not _has_trained_pair(out.prompt)):
                        raise PromptError(NO_TRAINED_PAIR)
                except PromptError as exc:
                    bad.setdefault((exc.reason, exc.retryable), []).append(it)
                    continue
                except EngineError as exc:
                    bad.setdefault((f"regeneration failed: {exc}", True), []).append(it)
                    continue
                it.prompt, it.generated = out.prompt, out.turns
                ready.append(it)
        finally:
            busy = time.monotonic() - start
            self.stats.generate_busy_s += busy
            self.stats.engine_busy_s += busy
        for (reason, retryable), group in bad.items():
            self._fail(group, reason, retryable=retryable)
        return ready

    def _capture(self, items: list[_Item]) -> None:
        if getattr(self._engine, "writes_to_store", False):
            self._capture_to_store(items)
            return
        start = time.monotonic()
        try:
            captured = self._engine.capture([it.prompt.input_ids.tolist() for it in items])
        except EngineError as exc:
            self._fail(items, f"capture failed: {exc}", retryable=True)
            return
        finally:
            self.stats.engine_busy_s += time.monotonic() - start
        for it, feats in zip(items, captured, strict=True):
            it.features = sample_features(it.prompt, feats, self._engine.plan)
        self._queue.put(items)

    def _capture_to_store(self, items: list[_Item]) -> None:
        """Engines that write features themselves (sglang) answer with specs; the writer then
        adds the loss mask, which only the producer knows, and commits."""
        from producer.engines.sglang import CapturedRef, CaptureItem

        start = time.monotonic()
        try:
            outcomes = self._engine.capture_to_store([  # type: ignore[attr-defined]
                CaptureItem(self._cfg.run_id, it.lease.sample_id, it.lease.generation,
                            tuple(it.prompt.input_ids.tolist())) for it in items])
        except EngineError as exc:
            self._fail(items, f"capture failed: {exc}", retryable=True)
            return
        finally:
            self.stats.engine_busy_s += time.monotonic() - start
        done: list[_Item] = []
        for it, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, CapturedRef):
                it.stored = outcome.tensors
                it.features = {"loss_mask": it.prompt.loss_mask.contiguous()}
                done.append(it)
            else:
                self._fail([it], outcome.reason, retryable=outcome.retryable)
        if done:
            self._queue.put(done)

    # ----------------------------------------------------------- writer side

    def _writer_loop(self) -> None:
        # Never leaves before the end marker, so the capture thread can always hand a batch on.
        while (items := self._queue.get()) is not None:
            try:
                if self._error is not None:
                    self._fail(items, f"producer stopping: {self._error}", retryable=True)
                    continue
                written = [it for it in items if self._write(it)]
                if written:
                    self._commit(written)
            except Exception as exc:
                if self._error is None:
                    self._error = exc
                self._draining.set()
                log.exception("writing or committing failed", extra=event(
                    "producer_writer_failed", run_id=self._cfg.run_id))

    def _write(self, it: _Item) -> bool:
        lease = it.lease
        with self._lock:
            if self._in_flight.get(lease.sample_id) is not it:
                return False  # the keeper found the lease gone while we captured
        delay = self._cfg.store_full_backoff_s
        wait = self._cfg.store_full_wait_s
        give_up = self._clock() + (self._lease_s if wait is None else wait)
        while True:
            try:
                specs = self._store.put_sample(self._cfg.run_id, lease.sample_id,
                                               lease.generation, it.features)
                break
            except StoreFull as exc:
                # Backpressure: the trainer frees samples as it commits steps; wait for room.
                if self._clock() + delay > give_up:
                    self._abandon(it, f"feature store full: {exc}")
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            except StoreError as exc:
                self._abandon(it, f"feature store write failed: {exc}")
                return False
        if it.stored:
            by_name = {spec.name: spec for spec in (*it.stored, *specs)}
            specs = [by_name[name] for name in self._engine.plan.tensors if name in by_name]
        it.ref = common_pb2.SampleRef(
            run_id=self._cfg.run_id, sample_id=lease.sample_id, prompt_id=lease.prompt_id,
            epoch=lease.epoch, generation=lease.generation, store=self._store.store_id,
            tensors=specs, num_tokens=it.prompt.num_tokens, producer_id=self._cfg.identity,
            capture=self._engine.plan.to_proto(),
            meta={"engine": self._engine.name, "truncated": str(it.prompt.truncated).lower()},
            generated=it.generated)
        it.features = None  # the store holds its own copy or reference now
        return True

    def _abandon(self, it: _Item, reason: str) -> None:
        """A write failed: remove what the engine already stored, give the prompt back."""
        if it.stored:
            self._store_remove([spec.key for spec in it.stored])
        self._fail([it], reason, retryable=True)

    def _commit(self, items: list[_Item]) -> None:
        commits = [cpb.SampleCommit(ref=it.ref, lease_token=it.lease.lease_token) for it in items]
        try:
            # A retry after an outage is safe: a sample committed already answers DUPLICATE,
            # and a lease that expired meanwhile answers FAILED_PRECONDITION.
            results = self._call("CommitSamples", self._stub.CommitSamples,
                                 cpb.CommitSamplesRequest(session_id=self.session_id,
                                                          samples=commits)).results
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or len(items) == 1:
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    self._lost(items, exc.details())
                    return
                raise
            # One stale lease fails the whole call: commit one by one to save the others.
            for it in items:
                self._commit([it])
            return
        for it, res in zip(items, results, strict=True):
            if res.status in (cpb.COMMIT_STATUS_ACCEPTED, cpb.COMMIT_STATUS_DUPLICATE):
                self.stats.samples_committed += 1
                self.stats.tokens_committed += it.prompt.num_tokens
            else:
                log.warning("commit rejected", extra=event(
                    "commit_rejected", run_id=self._cfg.run_id, sample_id=res.sample_id,
                    reason=res.reason))
                self._remove_keys([it])
            self._forget([it])

    # ------------------------------------------------------------ lifecycle

    def _keeper_loop(self) -> None:
        period = max(0.05, min(self._heartbeat_s, self._lease_s / 4))
        last_beat = 0.0
        while not self._stopped.wait(period):
            now = self._clock()
            if now - last_beat >= self._heartbeat_s * 0.9:
                try:
                    active = self._stub.Heartbeat(cpb.HeartbeatRequest(
                        session_id=self.session_id)).run_active
                    last_beat = now
                    if not active:
                        self.drain()
                except grpc.RpcError as exc:
                    log.warning("heartbeat failed: %s", exc.details(), extra=event(
                        "heartbeat_failed", run_id=self._cfg.run_id, session_id=self.session_id))
            self._extend_due(now)

    def _extend_due(self, now: float) -> None:
        with self._lock:
            due = [it for it in self._in_flight.values()
                   if it.expires - now < self._lease_s / 2]
        if not due:
            return
        try:
            self._extend(due, now)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                log.warning("extending leases failed: %s", exc.details(),
                            extra=event("extend_failed", run_id=self._cfg.run_id))
                return
            # One stale lease fails the whole call: extend one by one to keep the others.
            for it in due:
                try:
                    self._extend([it], now)
                except grpc.RpcError as one:
                    if one.code() == grpc.StatusCode.FAILED_PRECONDITION:
                        self._lost([it], one.details())

    def _extend(self, items: list[_Item], now: float) -> None:
        self._stub.ExtendLeases(cpb.ExtendLeasesRequest(
            session_id=self.session_id, leases=[it.handle() for it in items]))
        for it in items:
            it.expires = now + self._lease_s

    def _fail(self, items: list[_Item], reason: str, retryable: bool) -> None:
        try:
            self._call("FailPrompts", self._stub.FailPrompts, cpb.FailPromptsRequest(
                session_id=self.session_id, leases=[it.handle() for it in items],
                reason=reason, retryable=retryable))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            if len(items) > 1:
                for it in items:
                    self._fail([it], reason, retryable)
                return
            self._lost(items, exc.details())
            return
        self.stats.prompts_failed += len(items)
        for it in items:
            log.warning("prompt failed", extra=event(
                "prompt_failed", run_id=self._cfg.run_id, sample_id=it.lease.sample_id,
                reason=reason, retryable=retryable))
        self._forget(items)

    def _lost(self, items: list[_Item], why: str) -> None:
        """The coordinator no longer counts these leases as ours: drop the work and its keys."""
        self._remove_keys(items)
        newly = self._forget(items)
        self.stats.leases_lost += len(newly)
        for it in newly:
            log.warning("lease lost", extra=event(
                "lease_lost", run_id=self._cfg.run_id, sample_id=it.lease.sample_id, reason=why))

    def _remove_keys(self, items: list[_Item]) -> None:
        keys = [spec.key for it in items
                for spec in (it.ref.tensors if it.ref is not None else it.stored)]
        self._store_remove(keys)

    def _store_remove(self, keys: list[str]) -> None:
        if keys:
            try:
                self._store.remove(keys)
            except StoreError:
                log.warning("could not remove keys of an uncommitted sample",
                            extra=event("remove_failed", run_id=self._cfg.run_id))

    def _forget(self, items: list[_Item]) -> list[_Item]:
        """Drop items from the in-flight set; return those that were still in it."""
        with self._lock:
            # By identity: once a lease ends, the same sample may already be leased again (a
            # retry) under a new item, which must stay.
            gone = [it for it in items if self._in_flight.get(it.lease.sample_id) is it]
            for it in gone:
                del self._in_flight[it.lease.sample_id]
            self.stats.in_flight = len(self._in_flight)
        return gone

    def _unregister(self) -> None:
        try:
            released = self._stub.UnregisterWorker(cpb.UnregisterWorkerRequest(
                session_id=self.session_id)).released_leases
        except grpc.RpcError as exc:
            log.warning("unregister failed: %s", exc.details(),
                        extra=event("unregister_failed", run_id=self._cfg.run_id))
            return
        log.info("producer stopped", extra=event(
            "producer_stopped", run_id=self._cfg.run_id, session_id=self.session_id,
            committed=self.stats.samples_committed, failed=self.stats.prompts_failed,
            released=released))
