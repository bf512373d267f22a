"""The step commit across coordinator faults: an outage is waited out (the commit lands once the
coordinator is back), and a commit that fails for good stops training at once instead of leaving
the training thread waiting for a step the coordinator holds back until that commit."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from services.store import open_store
from tests.conftest import RetryCounter
from tests.trainer.coordinated import (
    Feeder,
    create_run,
    make_runner,
    status,
    store_url,
)


def test_a_step_commit_waits_out_a_coordinator_restart(tiny, coordinator, stub, master,
                                                       tmp_path: Path) -> None:
    from coordinator.server import CoordinatorConfig, CoordinatorProcess
    from services.rpc.server import ServerConfig

    run, features = create_run(stub, tiny, 8, "outage", micro_batch=2, checkpoint_every=100)
    writer = open_store(store_url(master, "outage", segment_mb=64, buffer_mb=16))
    feeder = Feeder(stub, writer, run, features)
    runner = make_runner(coordinator, "outage", store_url(master, "outage", buffer_mb=16),
                         tmp_path / "out", export=False, prefetch=1)
    commit = runner.session.commit_step

    def commit_after_outage(step: int, loss: float, metrics=None):  # type: ignore[no-untyped-def]
        if step == 2:
            coordinator.stop(grace=0)  # the commit of step 2 meets a coordinator that is gone
        return commit(step, loss, metrics)

    runner.session.commit_step = commit_after_outage  # type: ignore[method-assign]
    retries = RetryCounter()
    logging.getLogger("trainer.session").addHandler(retries)
    result: dict[str, int] = {}
    training = threading.Thread(target=lambda: result.setdefault("step", runner.run()))
    second = None
    try:
        feeder.feed(8)
        training.start()
        # A retry of ours comes only after the channel's own policy gave up: the commit
        # outlived it. (Not much longer: the run's sessions expire after 5 s of silence.)
        assert retries.seen.acquire(timeout=60), "the step commit was not retried"
        second = CoordinatorProcess(CoordinatorConfig(
            db_url=coordinator.cfg.db_url, reap_seconds=0.2,
            server=ServerConfig(listen=f"127.0.0.1:{coordinator.port}")))
        training.join(timeout=120)
        assert result.get("step") == 4
        assert status(stub, "outage").last_committed_step == 4
    finally:
        logging.getLogger("trainer.session").removeHandler(retries)
        feeder.stop()
        runner.close()
        writer.close()
        if second is not None:
            second.stop(grace=0.5)
    assert [s for s, _ in runner.losses] == [1, 2, 3, 4]


def test_a_failed_step_commit_stops_training_at_once(tiny, coordinator, stub, master,
                                                     tmp_path: Path) -> None:
    run, features = create_run(stub, tiny, 8, "refused", micro_batch=2, checkpoint_every=100)
    writer = open_store(store_url(master, "refused", segment_mb=64, buffer_mb=16))
    feeder = Feeder(stub, writer, run, features)
    # prefetch=1: with step 1 uncommitted, the coordinator never streams step 2.
    runner = make_runner(coordinator, "refused", store_url(master, "refused", buffer_mb=16),
                         tmp_path / "out", export=False, prefetch=1)

    def refused(step: int, loss: float, metrics=None):  # type: ignore[no-untyped-def]
        raise RuntimeError(f"step {step} refused")

    runner.session.commit_step = refused  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def train() -> None:
        try:
            runner.run()
        except BaseException as exc:
            errors.append(exc)

    training = threading.Thread(target=train, daemon=True)
    try:
        feeder.feed(8)
        training.start()
        training.join(timeout=120)
        assert not training.is_alive(), "training waits for a step that never comes"
        assert [str(e) for e in errors] == ["step 1 refused"]
        assert status(stub, "refused").last_committed_step == 0
    finally:
        feeder.stop()
        runner.close()
        writer.close()
    assert [s for s, _ in runner.losses] == [1]
