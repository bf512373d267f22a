"""gRPC servicer: validate, call the manager, map results. No SQL and no policy here."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from coordinator import validate
from coordinator.errors import InvalidArgument
from coordinator.manager import Coordinator
from services.api import coordinator_pb2 as cpb
from services.api import coordinator_pb2_grpc

STREAM_POLL_SECONDS = 0.25


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServiceServicer):
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    # Runs.
    def CreateRun(self, request: cpb.CreateRunRequest, context: grpc.ServicerContext
                  ) -> cpb.CreateRunResponse:
        return self.c.create_run(request.run_id, request.config, list(request.dataset_lines),
                                 request.vocab_map)

    def CreateRunStream(self, request_iterator: Iterator[cpb.CreateRunStreamRequest],
                        context: grpc.ServicerContext) -> cpb.CreateRunStreamResponse:
        first: cpb.CreateRunStreamRequest | None = None
        lines: list[str] = []
        for number, part in enumerate(request_iterator, start=1):
            if first is None:
                first = part
            elif part.run_id or part.HasField("config") or part.HasField("vocab_map"):
                raise InvalidArgument(
                    f"message {number}: only the first message names the run (run_id, config, "
                    "vocab_map); send dataset_lines alone after it")
            lines.extend(part.dataset_lines)
            validate.dataset_lines(len(lines))  # before the stream outgrows memory
        if first is None:
            raise InvalidArgument("the stream was empty; send run_id, config and vocab_map first")
        done = self.c.create_run(first.run_id, first.config, lines, first.vocab_map)
        return cpb.CreateRunStreamResponse(run=done.run, bad_rows=done.bad_rows,
                                           duplicate_prompts=done.duplicate_prompts)

    def GetRun(self, request: cpb.GetRunRequest, context: grpc.ServicerContext
               ) -> cpb.GetRunResponse:
        return cpb.GetRunResponse(run=self.c.get_run(request.run_id))

    def ListRuns(self, request: cpb.ListRunsRequest, context: grpc.ServicerContext
                 ) -> cpb.ListRunsResponse:
        return cpb.ListRunsResponse(runs=self.c.list_runs())

    def CancelRun(self, request: cpb.CancelRunRequest, context: grpc.ServicerContext
                  ) -> cpb.CancelRunResponse:
        return cpb.CancelRunResponse(run=self.c.cancel_run(request.run_id, request.reason))

    # Sessions.
    def RegisterWorker(self, request: cpb.RegisterWorkerRequest, context: grpc.ServicerContext
                       ) -> cpb.RegisterWorkerResponse:
        return self.c.register_worker(request.run_id, request.role, request.fingerprint,
                                      request.identity, request.trainer_group)

    def Heartbeat(self, request: cpb.HeartbeatRequest, context: grpc.ServicerContext
                  ) -> cpb.HeartbeatResponse:
        return cpb.HeartbeatResponse(run_active=self.c.heartbeat(request.session_id))

    def UnregisterWorker(self, request: cpb.UnregisterWorkerRequest,
                         context: grpc.ServicerContext) -> cpb.UnregisterWorkerResponse:
        return cpb.UnregisterWorkerResponse(
            released_leases=self.c.unregister_worker(request.session_id))

    # Producer side.
    def LeasePrompts(self, request: cpb.LeasePromptsRequest, context: grpc.ServicerContext
                     ) -> cpb.LeasePromptsResponse:
        # An empty answer is held for up to retry_after and given again as soon as the run
        # changes (a sample lost, a step committed): an idle producer then recaptures at once
        # instead of one poll later, so a loss costs a capture, not a poll interval.
        seen = self.c.changes.version
        res = self.c.lease_prompts(request.session_id, request.max_prompts)
        deadline = time.monotonic() + res.retry_after
        while not res.leases and not res.run_ended and context.is_active():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            now_seen = self.c.changes.wait(seen, remaining)
            if now_seen == seen:
                break
            seen = now_seen
            res = self.c.lease_prompts(request.session_id, request.max_prompts)
        waited = not res.leases and not res.run_ended
        return cpb.LeasePromptsResponse(
            leases=res.leases, retry_after_seconds=0.0 if waited else res.retry_after,
            exhausted=res.exhausted, run_ended=res.run_ended)

    def ExtendLeases(self, request: cpb.ExtendLeasesRequest, context: grpc.ServicerContext
                     ) -> cpb.ExtendLeasesResponse:
        resp = cpb.ExtendLeasesResponse()
        for deadline in self.c.extend_leases(request.session_id, request.leases):
            resp.deadlines.add().FromNanoseconds(int(deadline * 1e9))
        return resp

    def FailPrompts(self, request: cpb.FailPromptsRequest, context: grpc.ServicerContext
                    ) -> cpb.FailPromptsResponse:
        return cpb.FailPromptsResponse(dead_sample_ids=self.c.fail_prompts(
            request.session_id, request.leases, request.reason, request.retryable))

    def CommitSamples(self, request: cpb.CommitSamplesRequest, context: grpc.ServicerContext
                      ) -> cpb.CommitSamplesResponse:
        return cpb.CommitSamplesResponse(
            results=self.c.commit_samples(request.session_id, request.samples))

    # Trainer side.
    def StreamSteps(self, request: cpb.StreamStepsRequest, context: grpc.ServicerContext
                    ) -> Iterator[cpb.StreamStepsResponse]:
        sess = self.c.open_stream(request.session_id, request.rank, request.from_step,
                                  request.resume)
        step = request.from_step
        prefetch = max(request.prefetch, 1)
        seen = self.c.changes.version
        while context.is_active():
            d = self.c.deliver(sess, request.rank, step, prefetch)
            if d.kind == "READY":
                yield cpb.StreamStepsResponse(step=step, refs=d.refs, tail=cpb.TAIL_STATE_MORE)
                step += 1
            elif d.kind == "END":
                yield cpb.StreamStepsResponse(step=step, end_of_data=True,
                                              tail=cpb.TAIL_STATE_END_OF_DATA,
                                              dropped_samples=d.dropped)
                return
            else:
                seen = self.c.changes.wait(seen, STREAM_POLL_SECONDS)

    def CommitStep(self, request: cpb.CommitStepRequest, context: grpc.ServicerContext
                   ) -> cpb.CommitStepResponse:
        return cpb.CommitStepResponse(
            retire=self.c.commit_step(request.session_id, request.step, request.loss,
                                      dict(request.metrics)))

    def CommitCheckpoint(self, request: cpb.CommitCheckpointRequest,
                         context: grpc.ServicerContext) -> cpb.CommitCheckpointResponse:
        return cpb.CommitCheckpointResponse(
            retire=self.c.commit_checkpoint(request.session_id, request.step, request.uri))

    def ReportLost(self, request: cpb.ReportLostRequest, context: grpc.ServicerContext
                   ) -> cpb.ReportLostResponse:
        return cpb.ReportLostResponse(recapture=self.c.report_lost(
            request.session_id, request.sample_id, request.generation, request.reason))

    def RetireSamples(self, request: cpb.RetireSamplesRequest, context: grpc.ServicerContext
                      ) -> cpb.RetireSamplesResponse:
        return cpb.RetireSamplesResponse(
            retired=self.c.retire_samples(request.session_id, list(request.sample_ids)))

    # Status.
    def GetRunStatus(self, request: cpb.GetRunStatusRequest, context: grpc.ServicerContext
                     ) -> cpb.GetRunStatusResponse:
        return cpb.GetRunStatusResponse(status=self.c.run_status(request.run_id))

    def GetRunHistory(self, request: cpb.GetRunHistoryRequest, context: grpc.ServicerContext
                      ) -> cpb.GetRunHistoryResponse:
        return self.c.run_history(request)

    def WatchRunStatus(self, request: cpb.WatchRunStatusRequest, context: grpc.ServicerContext
                       ) -> Iterator[cpb.WatchRunStatusResponse]:
        interval = request.interval_seconds if request.interval_seconds > 0 else 1.0
        interval = min(max(interval, 0.1), 60.0)
        seen = self.c.changes.version
        while context.is_active():
            status = self.c.run_status(request.run_id)
            yield cpb.WatchRunStatusResponse(status=status)
            if status.state in (cpb.RUN_STATE_COMPLETED, cpb.RUN_STATE_CANCELLED):
                return
            seen = self.c.changes.wait(seen, interval)
