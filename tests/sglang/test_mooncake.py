"""The plugin writing through a real Mooncake master, read back by another client.

The SGLang server side (fake scheduler behind a local HTTP server, with the plugin's hooks) holds
one Mooncake client; the producer's engine holds a second one, as on a cluster.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from producer.engines.base import EngineConfig
from producer.engines.sglang import (
    CapturedRef,
    CaptureFailure,
    CaptureItem,
    SGLangEngine,
    SGLangOptions,
)
from services.store import open_store
from services.store.base import FeatureLost, FeatureStore
from services.store.mooncake_proc import MasterHandle, start_master
from tests.sglang import fakes
from tests.sglang.conftest import AUX_LAYERS, HIDDEN, VOCAB, install_on_fakes
from tests.sglang.http_server import FakeSGLangServer


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MasterHandle]:
    handle = start_master(log_path=tmp_path_factory.mktemp("mooncake") / "master.log")
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture
def mooncake_pair(master: MasterHandle) -> Iterator[tuple[FeatureStore, FeatureStore]]:
    """(the SGLang server's client, which lends the segment; the producer's client)."""
    server_side = open_store(master.url("st", segment_mb=64, buffer_mb=16))
    producer_side = open_store(master.url("st", buffer_mb=16))
    try:
        yield server_side, producer_side
    finally:
        producer_side.close()
        server_side.close()


def test_features_go_through_mooncake_from_its_registered_buffer(
    model_dir, mooncake_pair, hooked
) -> None:  # type: ignore[no-untyped-def]
    server_store, producer_store = mooncake_pair
    hooks = install_on_fakes(server_store, staging_bytes=1 << 20)
    prompts = {"a": [1, 2, 3, 4, 5], "b": [6, 7], "c": list(range(8, 40))}
    with FakeSGLangServer(HIDDEN, AUX_LAYERS) as server:
        engine = SGLangEngine(
            EngineConfig(model_path=model_dir),
            SGLangOptions(store=producer_store, server_urls=(server.url,)),
        )
        outcomes = engine.capture_to_store(
            [CaptureItem("run1", k, 0, tuple(v)) for k, v in prompts.items()]
        )
        engine.close()

    # The staging buffer is memory the Mooncake client registered: sent without another copy.
    staging = hooks._staging
    assert staging is not None
    assert server_store._arena.contains(staging.buffer)  # type: ignore[attr-defined]
    for outcome, (sample, ids) in zip(outcomes, prompts.items(), strict=True):
        assert isinstance(outcome, CapturedRef), outcome
        got = producer_store.get_sample(list(outcome.tensors))
        aux, hidden = fakes.synthetic_features(ids, HIDDEN, AUX_LAYERS)
        assert got["input_ids"].tolist() == ids, sample
        assert got["aux_hidden_state"].equal(aux) and got["hidden_state"].equal(hidden)


def test_a_refused_ref_is_removed_from_mooncake(model_dir, mooncake_pair, hooked) -> None:  # type: ignore[no-untyped-def]
    server_store, producer_store = mooncake_pair
    install_on_fakes(server_store)
    with FakeSGLangServer(HIDDEN, AUX_LAYERS) as server:
        engine = SGLangEngine(
            EngineConfig(model_path=model_dir),
            SGLangOptions(store=producer_store, server_urls=(server.url,)),
        )
        good = engine.capture_to_store([CaptureItem("run1", "good", 0, (1, 2, 3))])[0]
        server.mode = "wrong_length"
        bad = engine.capture_to_store([CaptureItem("run1", "bad", 0, (1, 2, 3))])[0]
        engine.close()

    assert isinstance(good, CapturedRef) and isinstance(bad, CaptureFailure)
    assert not bad.retryable
    bad_specs = [
        type(s)(
            name=s.name,
            dtype=s.dtype,
            shape=s.shape,
            nbytes=s.nbytes,
            key=s.key.replace("/good/", "/bad/"),
            checksum=s.checksum,
        )
        for s in good.tensors
    ]
    for spec in bad_specs:
        with pytest.raises(FeatureLost):
            producer_store.get_sample([spec])
    assert producer_store.get_sample(list(good.tensors))["input_ids"].tolist() == [1, 2, 3]
    assert VOCAB > 3
