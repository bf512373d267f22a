"""`draftflow report RUN`: one self-contained HTML page, one plot per figure, every step drawn."""

from __future__ import annotations

import re
from pathlib import Path

from coordinator.server import CoordinatorProcess
from draftflow.cli import main
from draftflow.report import plots_for, render
from services.api import common_pb2, coordinator_pb2_grpc
from services.api import coordinator_pb2 as cpb
from tests.coordinator import helpers as h
from tests.coordinator.test_wire import create, register

STEPS = 3


def _train(stub: coordinator_pb2_grpc.CoordinatorServiceStub) -> None:
    config = create(stub, n=STEPS)
    pid = register(stub, config, common_pb2.WORKER_ROLE_PRODUCER)
    leases = stub.LeasePrompts(cpb.LeasePromptsRequest(session_id=pid, max_prompts=8)).leases
    stub.CommitSamples(cpb.CommitSamplesRequest(
        session_id=pid, samples=[h.commit(le, "r1") for le in leases]))
    tid = register(stub, config, common_pb2.WORKER_ROLE_TRAINER)
    for msg in stub.StreamSteps(cpb.StreamStepsRequest(session_id=tid, rank=0, from_step=1,
                                                       prefetch=1)):
        if msg.end_of_data:
            break
        stub.CommitStep(cpb.CommitStepRequest(
            session_id=tid, step=msg.step, loss=3.0 / msg.step, metrics={
                "acc_0": 0.1 * msg.step, "acc_1": 0.05 * msg.step,
                "acceptance_length": 1.0 + 0.1 * msg.step, "lr": 1e-4,
                "data_wait_seconds": 0.01}))


def _plots(page: str) -> dict[str, list[int]]:
    """Each plot's metric and the number of points of each of its lines."""
    out = {}
    for metric, body in re.findall(r'<svg class="plot" data-metric="([^"]+)"(.*?)</svg>', page,
                                   re.S):
        out[metric] = [len(pts.split()) for pts in re.findall(r'points="([^"]*)"', body)]
    return out


def test_report_command_writes_a_page_with_every_step(
        coordinator: CoordinatorProcess, stub: coordinator_pb2_grpc.CoordinatorServiceStub,
        tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    _train(stub)
    out = tmp_path / "r1.html"
    assert main(["report", "r1", "--coordinator", f"127.0.0.1:{coordinator.port}",
                 "--out", str(out)]) == 0
    assert f"report written to {out}" in capsys.readouterr().out
    page = out.read_text()
    assert _plots(page) == {"loss": [STEPS], "accuracy": [STEPS, STEPS],
                            "acceptance_length": [STEPS], "lr": [STEPS],
                            "data_wait_seconds": [STEPS]}
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<script" not in page
    assert main(["report", "nope", "--coordinator", f"127.0.0.1:{coordinator.port}",
                 "--out", str(tmp_path / "nope.html")]) == 1
    assert "NOT_FOUND: run 'nope' does not exist" in capsys.readouterr().err


def test_non_finite_values_are_left_out_of_the_line_and_counted() -> None:
    records = [cpb.StepRecord(step=s, metrics={"loss": v})
               for s, v in ((1, 2.0), (2, float("nan")), (3, 1.0))]
    page = render("r1", records)
    assert _plots(page) == {"loss": [2]}
    assert "1 NaN or infinite values not drawn" in page
    assert [p.key for p in plots_for(["acc_10", "acc_2", "loss"])] == ["loss", "accuracy"]
    assert plots_for(["acc_10", "acc_2"])[0].series == ["acc_2", "acc_10"]
