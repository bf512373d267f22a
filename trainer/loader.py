"""``CoordinatorSteps``: the ``StepSource`` fed by the coordinator's step stream and the store.

A prefetch thread follows ``StreamSteps`` and reads each ref's tensors through the feature store
into preallocated buffers (pinned host memory when training on a GPU), so a step's data is ready
before the step needs it. A lost or corrupt tensor is reported with ``ReportLost`` and the stream
is reopened at the same step: the coordinator holds that step back until the sample has been
recaptured, then delivers it again with the new generation. Nothing is skipped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from services.api import common_pb2
from services.logs import event
from services.store.base import FeatureCorrupt, FeatureLost, FeatureStore
from services.tensors import DTYPE_TO_TORCH
from trainer.session import CoordinatorSession
from trainer.steps import Geometry, StepBundle
from trainer.strategies.base import Features

log = logging.getLogger(__name__)


class _Buffers:
    """One bundle's worth of reusable read buffers: ``per_rank`` samples x named tensors.

    Each tensor is read into the leading rows of a buffer sized for the longest sequence seen
    (at least ``rows``); buffers grow, never shrink, so steady state allocates nothing.
    """

    def __init__(self, per_rank: int, rows: int, pin: bool) -> None:
        self.rows, self.pin = rows, pin
        self.samples: list[dict[str, torch.Tensor]] = [{} for _ in range(per_rank)]

    def views(self, index: int, specs: Sequence[common_pb2.TensorSpec]) -> dict[str, torch.Tensor]:
        held = self.samples[index]
        out = {}
        for spec in specs:
            dtype, shape = DTYPE_TO_TORCH[spec.dtype], tuple(spec.shape)
            if not shape:  # scalars are too small to be worth pooling
                out[spec.name] = torch.empty((), dtype=dtype)
                continue
            buf = held.get(spec.name)
            if (buf is None or buf.dtype != dtype or buf.shape[1:] != shape[1:]
                    or buf.shape[0] < shape[0]):
                rows = max(shape[0], self.rows, buf.shape[0] if buf is not None else 0)
                buf = torch.empty((rows, *shape[1:]), dtype=dtype, pin_memory=self.pin)
                held[spec.name] = buf
            out[spec.name] = buf[: shape[0]]
        return out


@dataclass
class _Ready:
    step: int
    refs: list[common_pb2.SampleRef]
    samples: list[Features]
    slot: int


@dataclass
class _End:
    step: int
    dropped: int


class CoordinatorSteps:
    """This rank's step bundles, streamed from the coordinator and read from the feature store.

    ``prefetch`` bundles are read ahead of the one being trained. Counters for status:
    ``wait_seconds`` (total time ``steps`` blocked on data), ``last_wait_seconds``,
    ``lost_reported``, ``end_step`` / ``dropped`` once the stream ended, and ``refs`` of the
    bundle last handed out.
    """

    def __init__(self, session: CoordinatorSession, store: FeatureStore, geometry: Geometry,
                 rank: int = 0, prefetch: int = 2, max_length: int = 0,
                 pin_memory: bool = False, feature_names: Sequence[str] | None = None) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch={prefetch}: must be >= 1")
        self.session, self.store, self.geometry, self.rank = session, store, geometry, rank
        self.prefetch = prefetch
        self.feature_names = set(feature_names) if feature_names else None
        self._pool = [_Buffers(geometry.per_rank, max_length, pin_memory)
                      for _ in range(prefetch + 1)]
        self._free: queue.Queue[int] = queue.Queue()
        self._ready: queue.Queue[_Ready | _End | BaseException] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wait_seconds = 0.0
        self.last_wait_seconds = 0.0
        self.lost_reported = 0
        self.end_step: int | None = None
        self.dropped = 0
        self.refs: list[common_pb2.SampleRef] = []

    # -- consumer side ------------------------------------------------------------------------

    def steps(self, from_step: int) -> Iterator[StepBundle]:
        """Bundles from ``from_step`` on; a bundle's buffers are reused once the next is asked."""
        if self._thread is not None:
            raise RuntimeError("steps() was already started; use one CoordinatorSteps per pass")
        for i in range(len(self._pool)):
            self._free.put(i)
        self._thread = threading.Thread(target=self._run, args=(from_step,),
                                        name=f"trainer-prefetch-{self.rank}", daemon=True)
        self._thread.start()
        held: int | None = None
        while True:
            start = time.perf_counter()
            item = self._ready.get()
            self.last_wait_seconds = time.perf_counter() - start
            self.wait_seconds += self.last_wait_seconds
            if held is not None:
                self._free.put(held)
                held = None
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, _End):
                self.end_step, self.dropped = item.step, item.dropped
                return
            held = item.slot
            self.refs = item.refs
            yield StepBundle(item.step, item.samples)

    def close(self) -> None:
        """Stop the prefetch thread and the stream."""
        self._stop.set()
        self.session.interrupt()
        self._free.put(-1)  # wake a reader waiting for a free slot
        if self._thread is not None:
            self._thread.join(timeout=10)

    # -- prefetch thread ----------------------------------------------------------------------

    def _run(self, from_step: int) -> None:
        step, resume = from_step, True  # the first stream opens at the resume point
        try:
            while not self._stop.is_set():
                step, done = self._follow(step, resume)
                resume = False
                if done:
                    return
        except BaseException as exc:  # handed to the training thread, which re-raises it
            if not self._stop.is_set():
                self._ready.put(exc)

    def _follow(self, step: int, resume: bool) -> tuple[int, bool]:
        """Read steps from one stream; return (step to reopen at, whether the stream ended)."""
        for msg in self.session.stream(self.rank, step, self.prefetch, self._stop, resume):
            if msg.end_of_data:
                self._ready.put(_End(msg.step, msg.dropped_samples))
                return msg.step, True
            if len(msg.refs) != self.geometry.per_rank:
                raise RuntimeError(
                    f"step {msg.step}: the coordinator delivered {len(msg.refs)} of "
                    f"{self.geometry.per_rank} samples for rank {self.rank}; the others went "
                    "DEAD after repeated losses and the data ran out before a captured sample "
                    "could take their place (see `draftflow status`). Raise "
                    "lease.max_deliveries or fix the feature store, then start a new run")
            slot = self._free.get()
            if slot < 0 or self._stop.is_set():
                return msg.step, True
            samples, lost = self._read(msg.refs, self._pool[slot])
            if lost:
                self._free.put(slot)
                self._report(msg.step, lost)
                return msg.step, False  # reopen: the coordinator re-delivers this step
            self._ready.put(_Ready(msg.step, list(msg.refs), samples, slot))
            step = msg.step + 1
        return step, True

    def _read(self, refs: Sequence[common_pb2.SampleRef], buffers: _Buffers
              ) -> tuple[list[Features], list[tuple[common_pb2.SampleRef, str]]]:
        samples: list[Features] = []
        lost: list[tuple[common_pb2.SampleRef, str]] = []
        for i, ref in enumerate(refs):
            specs = [t for t in ref.tensors
                     if self.feature_names is None or t.name in self.feature_names]
            try:
                samples.append(self.store.get_sample(specs, buffers.views(i, specs)))
            except (FeatureLost, FeatureCorrupt) as exc:
                lost.append((ref, f"{type(exc).__name__}: {exc}"))
        return samples, lost

    def _report(self, step: int, lost: list[tuple[common_pb2.SampleRef, str]]) -> None:
        for ref, reason in lost:
            recapture = self.session.report_lost(ref, reason)
            self.lost_reported += 1
            log.warning("sample lost, waiting for recapture", extra=event(
                "sample_lost", run_id=ref.run_id, sample_id=ref.sample_id,
                generation=ref.generation, step=step, reason=reason, recapture=recapture))
