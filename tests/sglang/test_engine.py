"""The sglang capture engine in both modes: start-up refusals, capture, verification, cleanup."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from producer.engines.base import EngineConfig, EngineError
from producer.engines.sglang import (
    PROBE_RUN_ID,
    CapturedRef,
    CaptureFailure,
    CaptureItem,
    SGLangEngine,
    SGLangOptions,
)
from producer.sglang_plugin import STORE_URL_ENV, wire
from tests.sglang import fake_sglang, fakes
from tests.sglang.conftest import AUX_LAYERS, HIDDEN, VOCAB, absent, install_on_fakes
from tests.sglang.http_server import FakeSGLangServer


@pytest.fixture
def servers(store, hooked) -> Iterator[list[FakeSGLangServer]]:  # type: ignore[no-untyped-def]
    install_on_fakes(store)
    with FakeSGLangServer(HIDDEN, AUX_LAYERS) as a, FakeSGLangServer(HIDDEN, AUX_LAYERS) as b:
        yield [a, b]


def http_engine(model_dir: str, store: Any, urls: list[str], **options: Any) -> SGLangEngine:
    budget = options.pop("token_budget", 8192)
    return SGLangEngine(
        EngineConfig(model_path=model_dir, token_budget=budget),
        SGLangOptions(store=store, server_urls=tuple(urls), **options),
    )


def item(sample: str, ids: list[int]) -> CaptureItem:
    return CaptureItem("run1", sample, 0, tuple(ids))


def wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 20
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    return thread, out


def test_http_capture_spreads_over_servers_and_returns_verified_refs(
    model_dir, store, servers
) -> None:  # type: ignore[no-untyped-def]
    engine = http_engine(model_dir, store, [s.url for s in servers], max_in_flight=2)
    prompts = {f"p{i}": [(i * 7 + j) % VOCAB for j in range(3 + i)] for i in range(8)}
    for s in servers:
        s.release.clear()

    thread, out = in_thread(
        lambda: engine.capture_to_store([item(k, v) for k, v in prompts.items()])
    )
    wait_until(lambda: sum(s.in_flight for s in servers) == 4, "two requests on each server")
    for s in servers:
        s.release.set()
    thread.join()
    engine.close()

    outcomes = out[0]
    assert [type(o) for o in outcomes] == [CapturedRef] * len(prompts)
    assert [s.max_in_flight for s in servers] == [2, 2]
    for outcome, (sample, ids) in zip(outcomes, prompts.items(), strict=True):
        assert (outcome.sample_id, outcome.num_tokens) == (sample, len(ids))
        assert outcome.aux_layer_ids == tuple(AUX_LAYERS)
        got = store.get_sample(list(outcome.tensors))
        aux, hidden = fakes.synthetic_features(ids, HIDDEN, AUX_LAYERS)
        assert got["input_ids"].tolist() == ids
        assert got["aux_hidden_state"].equal(aux) and got["hidden_state"].equal(hidden)


def test_requests_are_greedy_single_token_salted_and_carry_the_target(
    model_dir, store, servers
) -> None:  # type: ignore[no-untyped-def]
    engine = http_engine(model_dir, store, [servers[0].url])
    engine.capture_to_store([item("s1", [1, 2, 3])])
    engine.close()

    probe, body = servers[0].bodies
    assert probe["sampling_params"]["custom_params"][wire.REQUEST_KEY]["run_id"] == PROBE_RUN_ID
    assert body["input_ids"] == [1, 2, 3]
    assert body["return_hidden_states"] is True
    assert body["cache_salt"] == body["rid"]
    params = body["sampling_params"]
    assert (params["max_new_tokens"], params["temperature"], params["ignore_eos"]) == (1, 0.0, True)
    assert (
        params["custom_params"][wire.REQUEST_KEY]
        == wire.CaptureTarget(store.store_id, "run1", "s1", 0).to_params()
    )


def test_the_token_budget_bounds_what_is_in_flight_on_a_server(model_dir, store, servers) -> None:  # type: ignore[no-untyped-def]
    server = servers[0]
    engine = http_engine(model_dir, store, [server.url], max_in_flight=8, token_budget=10)
    server.release.clear()
    thread, out = in_thread(
        lambda: engine.capture_to_store(
            [item(f"s{i}", [1, 2, 3, 4]) for i in range(5)] + [item("long", list(range(1, 15)))]
        )
    )
    wait_until(lambda: server.in_flight == 2, "two 4-token prompts in flight")
    time.sleep(0.2)  # a broken budget would send more meanwhile
    server.release.set()
    thread.join()
    engine.close()

    assert all(isinstance(o, CapturedRef) for o in out[0])
    assert server.max_tokens_in_flight == 14  # the 14-token prompt ran, alone
    assert server.max_in_flight == 2


def test_a_server_not_launched_for_capture_is_refused_naming_each_flag(
    model_dir, store, hooked
) -> None:  # type: ignore[no-untyped-def]
    stock = {**fake_sglang.resolve({}), "version": "0.5.23"}
    with (
        FakeSGLangServer(HIDDEN, AUX_LAYERS, server_args=stock) as server,
        pytest.raises(EngineError) as err,
    ):
        http_engine(model_dir, store, [server.url])
    message = str(err.value)
    assert f"SGLang {server.url} is not launched for capture" in message
    for flag in (
        "--enable-return-aux-hidden-states is off",
        "--chunked-prefill-size is 8192",
        "--skip-tokenizer-init is off",
        "--disable-overlap-schedule is off",
        "--return-aux-hidden-state-layer-ids 1 3 4",
    ):
        assert flag in message


def test_an_old_sglang_is_refused(model_dir, store, hooked) -> None:  # type: ignore[no-untyped-def]
    args = {**fakes.capture_server_args(AUX_LAYERS), "version": "0.5.9"}
    with (
        FakeSGLangServer(HIDDEN, AUX_LAYERS, server_args=args) as server,
        pytest.raises(EngineError, match=r"no capture-only aux hidden-state mode"),
    ):
        http_engine(model_dir, store, [server.url])


def test_a_server_without_the_plugin_fails_the_start_up_probe(model_dir, store, servers) -> None:  # type: ignore[no-untyped-def]
    servers[0].mode = "no_plugin"
    with pytest.raises(EngineError, match=r"probe .* plugin is not active"):
        http_engine(model_dir, store, [servers[0].url])
    [probe] = servers[0].bodies
    target = probe["sampling_params"]["custom_params"][wire.REQUEST_KEY]
    # The plugin wrote the probe; the engine removed it when the answer lacked the ref.
    assert servers[0].scheduler.batches == 1
    assert absent(store, target["sample_id"], 2, run_id=PROBE_RUN_ID)


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("wrong_length", "captured 2 rows of a 3-token prompt"),
        ("wrong_layers", "aux layers [0, 1, 2] differ from the run's [1, 3, 4]"),
    ],
)
def test_a_ref_that_does_not_match_frees_its_keys_and_fails_for_good(
    model_dir, store, servers, mode, reason
) -> None:  # type: ignore[no-untyped-def]
    engine = http_engine(model_dir, store, [servers[0].url])
    servers[0].mode = mode
    [outcome] = engine.capture_to_store([item("bad", [1, 2, 3])])
    engine.close()

    assert isinstance(outcome, CaptureFailure)
    assert outcome.retryable is False and reason in outcome.reason
    assert absent(store, "bad", 3)
    assert servers[0].scheduler.batches == 2  # the probe's, then this prompt's: it was written


def test_a_failing_server_fails_the_prompt_retryably(model_dir, store, servers) -> None:  # type: ignore[no-untyped-def]
    engine = http_engine(model_dir, store, [servers[0].url])
    servers[0].mode = "error500"
    [outcome] = engine.capture_to_store([item("s", [1, 2])])
    engine.close()
    assert isinstance(outcome, CaptureFailure) and outcome.retryable is True
    assert "answered 500" in outcome.reason and "scheduler died" in outcome.reason


def test_bad_prompts_fail_without_reaching_sglang(model_dir, store, servers) -> None:  # type: ignore[no-untyped-def]
    engine = http_engine(model_dir, store, [servers[0].url])
    sent_before = len(servers[0].bodies)
    outcomes = engine.capture_to_store(
        [item("empty", []), item("oov", [1, VOCAB]), item("fine", [1, 2])]
    )
    engine.close()
    assert [type(o) for o in outcomes] == [CaptureFailure, CaptureFailure, CapturedRef]
    assert "outside the target vocabulary" in outcomes[1].reason
    assert len(servers[0].bodies) == sent_before + 1


def test_the_tensor_contract_points_the_caller_at_capture_to_store(
    model_dir, store, servers
) -> None:  # type: ignore[no-untyped-def]
    engine = http_engine(model_dir, store, [servers[0].url])
    assert engine.writes_to_store is True
    with pytest.raises(EngineError, match="capture_to_store"):
        engine.capture([[1, 2]])
    engine.close()


def test_in_process_engine_batches_by_token_budget(model_dir, store, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "sglang", fake_sglang)
    monkeypatch.setattr(fake_sglang, "open_store", lambda: store)
    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    config = EngineConfig(model_path=model_dir, token_budget=8)
    engine = SGLangEngine(
        config, SGLangOptions(store=store, store_url="memory://st", engine_kwargs={"tp_size": 1})
    )
    [sglang_engine] = fake_sglang.Engine.instances[-1:]
    try:
        import os

        assert os.environ[STORE_URL_ENV] == "memory://st"
        assert sglang_engine.kwargs["return_aux_hidden_state_layer_ids"] == AUX_LAYERS
        prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
        outcomes = engine.capture_to_store([item(f"s{i}", p) for i, p in enumerate(prompts)])
    finally:
        engine.close()

    assert sglang_engine.closed
    assert all(isinstance(o, CapturedRef) for o in outcomes)
    # The probe, then longest first, groups whose rows x longest row fit 8 tokens: [5], [4, 3], [2].
    assert sglang_engine.calls == [1, 1, 2, 1]
    for outcome, ids in zip(outcomes, prompts, strict=True):
        assert store.get_sample(list(outcome.tensors))["input_ids"].tolist() == ids
