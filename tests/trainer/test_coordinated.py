"""Coordinator-driven training in process: Mooncake reads match in-process features bit for bit,
and a trainer whose node does not match the run is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.api import common_pb2
from services.store import open_store
from services.store.base import FeatureLost
from tests.trainer.coordinated import (
    Feeder,
    composition,
    create_run,
    make_runner,
    samples,
    status,
    step_losses,
    store_url,
)
from trainer.config import TrainerConfig
from trainer.loop import build_trainer
from trainer.session import RegistrationRefused, aux_layer_ids
from trainer.steps import InProcessSteps

N = 16


def test_mooncake_reads_train_bit_identically_to_in_process_features(
        tiny, coordinator, stub, master, tmp_path: Path) -> None:
    run, features = create_run(stub, tiny, N, "parity", micro_batch=2, accumulation=2,
                               checkpoint_every=2)
    store_id = "parity"
    writer = open_store(store_url(master, store_id, segment_mb=64, buffer_mb=16))
    try:
        feeder = Feeder(stub, writer, run, features)
        feeder.feed(N)
        feeder.stop()
        runner = make_runner(coordinator, "parity", store_url(master, store_id, buffer_mb=16),
                             tmp_path / "out", prefetch=2, export=False)
        try:
            last = runner.run()
        finally:
            runner.close()
        # Committed steps free their samples' tensors from the store.
        for row in samples(coordinator, "parity"):
            ref = common_pb2.SampleRef.FromString(row.ref)
            with pytest.raises(FeatureLost):
                writer.get_sample(ref.tensors)
    finally:
        writer.close()
    assert last == N // 4 and runner.source is not None and runner.source.end_step == last + 1

    # The same samples, handed over in process in the order the coordinator composed them.
    cfg = TrainerConfig.from_run(run.config)
    baseline = build_trainer(cfg, tiny.target_dir, list(run.vocab_map.draft_token_ids),
                             aux_layer_ids(run), parallel="none")
    expected: list[tuple[int, float]] = []
    baseline.run(InProcessSteps(composition(coordinator, "parity", features), cfg.geometry),
                 on_step=lambda s, m: expected.append((s, m["loss"])))
    assert runner.losses == expected  # bit-identical, not approximately equal
    assert step_losses(coordinator, "parity") == [loss for _, loss in expected]

    st = status(stub, "parity")
    assert st.last_committed_step == st.last_checkpoint_step == last
    assert {k: v for k, v in st.samples.items() if v} == {"RETIRED": N}
    assert {r.step for r in samples(coordinator, "parity")} == set(range(1, last + 1))


def test_a_node_whose_fingerprint_differs_is_refused(tiny, coordinator, stub,
                                                     tmp_path: Path) -> None:
    run, _ = create_run(stub, tiny, 4, "fp")
    with pytest.raises(RegistrationRefused, match=f"run has {run.fingerprint}"):
        make_runner(coordinator, "fp", "memory://fp", tmp_path / "out", revision="other-weights")
