"""The in-process stub answers as the gRPC service does: same responses, same refusals."""

from __future__ import annotations

import grpc
import pytest

from coordinator.db import make_engine, migrate
from coordinator.manager import Coordinator
from draftflow.inproc import InProcessCoordinatorStub
from services.api import common_pb2
from services.api import coordinator_pb2 as cpb
from services.rpc.server import REASON_KEY
from tests.coordinator.helpers import dataset, fingerprint, run_config, vocab_map


@pytest.fixture
def inproc(sqlite_url: str) -> InProcessCoordinatorStub:
    engine = make_engine(sqlite_url)
    migrate(engine)
    return InProcessCoordinatorStub(Coordinator(engine))


def test_refusals_carry_code_details_and_reason(inproc: InProcessCoordinatorStub) -> None:
    cfg = run_config(micro=2)
    inproc.CreateRun(cpb.CreateRunRequest(run_id="r", config=cfg, dataset_lines=dataset(4),
                                          vocab_map=vocab_map()))
    with pytest.raises(grpc.RpcError) as refused:
        inproc.RegisterWorker(cpb.RegisterWorkerRequest(
            run_id="r", role=common_pb2.WORKER_ROLE_PRODUCER, fingerprint="other"))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "fingerprint mismatch" in refused.value.details()
    with pytest.raises(grpc.RpcError) as missing:
        inproc.GetRun(cpb.GetRunRequest(run_id="nope"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    trainer = inproc.RegisterWorker(cpb.RegisterWorkerRequest(
        run_id="r", role=common_pb2.WORKER_ROLE_TRAINER, fingerprint=fingerprint(cfg),
        trainer_group="a"))
    inproc.RegisterWorker(cpb.RegisterWorkerRequest(
        run_id="r", role=common_pb2.WORKER_ROLE_TRAINER, fingerprint=fingerprint(cfg),
        trainer_group="b"))
    with pytest.raises(grpc.RpcError) as fenced:
        inproc.CommitStep(cpb.CommitStepRequest(session_id=trainer.session_id, step=1))
    assert dict(fenced.value.trailing_metadata())[REASON_KEY] == "SESSION_SUPERSEDED"


def test_step_stream_ends_cancelled_when_the_client_cancels(
        inproc: InProcessCoordinatorStub) -> None:
    cfg = run_config(micro=2)
    inproc.CreateRun(cpb.CreateRunRequest(run_id="r", config=cfg, dataset_lines=dataset(4),
                                          vocab_map=vocab_map()))
    trainer = inproc.RegisterWorker(cpb.RegisterWorkerRequest(
        run_id="r", role=common_pb2.WORKER_ROLE_TRAINER, fingerprint=fingerprint(cfg),
        trainer_group="g"))
    call = inproc.StreamSteps(cpb.StreamStepsRequest(session_id=trainer.session_id, rank=0,
                                                     from_step=1, prefetch=1))
    call.cancel()  # nothing is captured: the stream would wait for samples forever
    with pytest.raises(grpc.RpcError) as ended:
        list(call)
    assert ended.value.code() == grpc.StatusCode.CANCELLED
