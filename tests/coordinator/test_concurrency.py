"""Many producers and trainer ranks at once against PostgreSQL, through two coordinators."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from coordinator.server import CoordinatorConfig, CoordinatorProcess
from services.api import common_pb2, coordinator_pb2_grpc
from services.api import coordinator_pb2 as cpb
from services.rpc.client import open_channel
from services.rpc.server import ServerConfig
from tests.coordinator import helpers as h

PRODUCERS, RANKS, PROMPTS = 8, 4, 240


@pytest.mark.postgres
def test_eight_producers_four_ranks_two_coordinators(pg_url: str) -> None:
    procs = [CoordinatorProcess(CoordinatorConfig(
        db_url=pg_url, server=ServerConfig(listen="127.0.0.1:0", max_workers=64)))
        for _ in range(2)]
    stubs = [coordinator_pb2_grpc.CoordinatorServiceStub(open_channel(f"127.0.0.1:{p.port}"))
             for p in procs]
    config = h.run_config(world=RANKS, micro=2, accum=1, high=64, low=32)
    stubs[0].CreateRun(cpb.CreateRunRequest(run_id="r1", config=config,
                                            dataset_lines=h.dataset(PROMPTS),
                                            vocab_map=h.vocab_map()))
    errors: list[BaseException] = []
    committed: Counter[str] = Counter()
    lock = threading.Lock()

    def produce(i: int) -> None:
        try:
            stub = stubs[i % 2]
            sid = stub.RegisterWorker(cpb.RegisterWorkerRequest(
                run_id="r1", role=common_pb2.WORKER_ROLE_PRODUCER,
                fingerprint=h.fingerprint(config), identity=f"p{i}")).session_id
            while True:
                res = stub.LeasePrompts(cpb.LeasePromptsRequest(session_id=sid, max_prompts=4))
                if res.exhausted:
                    return
                if not res.leases:
                    threading.Event().wait(0.02)
                    continue
                out = stub.CommitSamples(cpb.CommitSamplesRequest(
                    session_id=sid, samples=[h.commit(le, "r1") for le in res.leases]))
                assert {r.status for r in out.results} == {cpb.COMMIT_STATUS_ACCEPTED}
                with lock:
                    committed.update(le.sample_id for le in res.leases)
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    delivered: dict[tuple[int, int], list[str]] = {}
    barrier = threading.Barrier(RANKS)
    ends: list[int] = []

    def train(rank: int) -> None:
        try:
            stub = stubs[rank % 2]
            sid = stub.RegisterWorker(cpb.RegisterWorkerRequest(
                run_id="r1", role=common_pb2.WORKER_ROLE_TRAINER,
                fingerprint=h.fingerprint(config), identity=f"rank{rank}",
                trainer_group="g")).session_id
            for msg in stub.StreamSteps(cpb.StreamStepsRequest(
                    session_id=sid, rank=rank, from_step=1, prefetch=2)):
                if msg.end_of_data:
                    ends.append(msg.step)
                    return
                delivered[(msg.step, rank)] = [r.sample_id for r in msg.refs]
                barrier.wait(timeout=20)  # every rank has its slice before the step commits
                if rank == 0:
                    stub.CommitStep(cpb.CommitStepRequest(session_id=sid, step=msg.step))
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(PRODUCERS)]
    threads += [threading.Thread(target=train, args=(r,)) for r in range(RANKS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    try:
        assert not errors, errors
        assert not any(t.is_alive() for t in threads)
        assert len(committed) == PROMPTS and max(committed.values()) == 1
        flat = [s for ids in delivered.values() for s in ids]
        assert len(flat) == len(set(flat)) == PROMPTS  # every sample in exactly one step
        steps = PROMPTS // (RANKS * 2)
        assert sorted({step for step, _ in delivered}) == list(range(1, steps + 1))
        assert all(len(ids) == 2 for ids in delivered.values())
        assert ends == [steps + 1] * RANKS
        status = stubs[1].GetRunStatus(cpb.GetRunStatusRequest(run_id="r1")).status
        assert status.state == cpb.RUN_STATE_COMPLETED
        assert status.samples["TRAINED"] == PROMPTS
        assert status.samples["LOST"] == status.samples["DEAD"] == 0
        assert status.prompts["CAPTURED"] == PROMPTS
    finally:
        for p in procs:
            p.stop(0.5)
