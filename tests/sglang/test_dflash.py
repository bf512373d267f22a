"""DFlash and Domino plans through the SGLang plugin and engine: the plan's layers under
``hidden_states`` ([L, K*H], ascending ids, id i = output of layer i), no final hidden state read,
copied or written; servers on the other convention refused. EAGLE3's wire is unchanged."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from producer.engines.base import EngineConfig, EngineError
from producer.engines.sglang import (
    CapturedRef,
    CaptureFailure,
    CaptureItem,
    SGLangEngine,
    SGLangOptions,
    capture_target,
)
from producer.sglang_plugin import STORE_URL_ENV, wire
from producer.sglang_plugin.checks import Expected, check_ref, expected_keys, server_problems
from services.api import common_pb2
from services.capture import plan_for
from services.tensors import make_key, tensor_checksum
from tests.sglang import fake_sglang, fakes
from tests.sglang.conftest import HIDDEN, DictStore, install_on_fakes
from tests.sglang.http_server import FakeSGLangServer

LAYERS = [0, 2, 5]
PLAN = plan_for("dflash", LAYERS, fakes.NUM_LAYERS)


def dflash_body(sample_id: str, ids: list[int], *, store_id: str = "st") -> dict[str, Any]:
    target = wire.CaptureTarget(
        store_id, "run1", sample_id, 0, PLAN.layers_tensor, PLAN.final_hidden
    )
    return {
        "rid": f"rid-{sample_id}",
        "input_ids": ids,
        "sampling_params": {
            "max_new_tokens": 1,
            "temperature": 0.0,
            "ignore_eos": True,
            "custom_params": {wire.REQUEST_KEY: target.to_params()},
        },
        "return_hidden_states": True,
        "cache_salt": f"rid-{sample_id}",
    }


def keys_of(sample_id: str, names: tuple[str, ...]) -> list[str]:
    return [make_key("st", "run1", sample_id, 0, n) for n in names]


class NeverRead:
    """Stands in for the post-norm rows: any slice or copy of it fails the test."""

    shape = (0, HIDDEN)

    def __getitem__(self, item: Any) -> Any:
        raise AssertionError("the plugin read the final hidden state for a DFlash plan")


# -- the plugin ----------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [LAYERS, [4], [6], [1, 3, 4, 6]], ids=str)
def test_a_dflash_request_writes_the_plans_layers_and_no_final_state(hooked, layers) -> None:
    store = DictStore("st")
    install_on_fakes(store)
    scheduler = fakes.FakeScheduler(HIDDEN, layers, capture="dflash")
    prompts = {"a": [5, 6, 7, 8], "b": [9, 10], "c": [11]}
    bodies = [dflash_body(sample, ids) for sample, ids in prompts.items()]
    batch, result = scheduler.build(bodies)
    result.logits_output.last_hidden_states = NeverRead()  # type: ignore[assignment]
    scheduler.processor.process_batch_result_prefill(batch, result)
    responses = fakes.tokenizer_side(scheduler.socket[-1])

    names = ("input_ids", "hidden_states")
    assert sorted(store.data) == sorted(k for s in prompts for k in keys_of(s, names))
    for ids, response in zip(prompts.values(), responses, strict=True):
        ref = wire.ref_from_meta_info(response["meta_info"])
        assert ref["ok"] is True, ref
        assert ref["aux_layer_ids"] == layers
        specs = [wire.spec_from_wire(t) for t in ref["tensors"]]
        assert [s.name for s in specs] == list(names)
        assert [list(s.shape) for s in specs] == [[len(ids)], [len(ids), len(layers) * HIDDEN]]
        got = store.get_sample(specs)
        assert got["input_ids"].tolist() == ids
        # The outputs of the plan's layers (HF's hidden_states[i + 1]), in the plan's order.
        outputs = fakes.layer_outputs(ids, HIDDEN)
        assert got["hidden_states"].equal(torch.cat([outputs[i + 1] for i in layers], dim=-1))
        assert got["hidden_states"].equal(fakes.synthetic_features(ids, HIDDEN, layers)[0])


def test_the_staging_buffer_holds_no_final_rows(hooked) -> None:
    store = DictStore("st")
    hooks = install_on_fakes(store, staging_bytes=64)
    ids = list(range(1, 41))
    fakes.FakeScheduler(HIDDEN, LAYERS, capture="dflash").run([dflash_body("a", ids)])
    # Grown to exactly the batch: ids (8 B/token) + K*H bf16 rows (2 B each), 64-byte aligned.
    assert hooks._staging is not None
    assert hooks._staging.capacity == 40 * 8 + 40 * len(LAYERS) * HIDDEN * 2


@pytest.mark.parametrize(
    ("server", "body", "flag"),
    [
        ("eagle3", "dflash", "--speculative-algorithm DFLASH"),
        ("dflash", "eagle3", "--speculative-algorithm EAGLE3"),
    ],
)
def test_a_request_on_the_other_convention_is_refused(hooked, server, body, flag) -> None:
    from tests.sglang.test_plugin import capture_body

    store = DictStore("st")
    install_on_fakes(store)
    scheduler = fakes.FakeScheduler(HIDDEN, [1, 3, 4], capture=server)
    request = dflash_body("a", [1, 2, 3]) if body == "dflash" else capture_body("a", [1, 2, 3])
    [response] = scheduler.run([request])
    ref = wire.ref_from_meta_info(response["meta_info"])
    assert ref["ok"] is False and ref["retryable"] is False
    assert flag in ref["error"]
    assert store.data == {}


def test_rows_that_do_not_split_into_the_servers_layers_are_refused(hooked) -> None:
    store = DictStore("st")
    install_on_fakes(store)
    args = fakes.capture_server_args([0, 1, 2, 3, 4], "dflash")
    scheduler = fakes.FakeScheduler(HIDDEN, LAYERS, server_args=args)
    [response] = scheduler.run([dflash_body("a", [1, 2])])
    ref = wire.ref_from_meta_info(response["meta_info"])
    assert ref["ok"] is False and "does not split into the server's 5 layers" in ref["error"]
    assert store.data == {}


def test_the_fake_model_refuses_the_last_layer_as_sglang_does() -> None:
    with pytest.raises(ValueError, match=r"captured 1 aux hidden states, but .* names 2"):
        fakes.FakeScheduler(HIDDEN, [3, 7], capture="dflash").build([dflash_body("a", [1])])


# -- the wire ------------------------------------------------------------------------------------


def test_the_layout_rides_in_the_target_and_eagle3_requests_are_unchanged() -> None:
    dflash = wire.CaptureTarget("st", "r", "s", 3, "hidden_states", False)
    assert dflash.to_params()["layers_tensor"] == "hidden_states"
    assert dflash.to_params()["final_hidden"] is False
    assert wire.CaptureTarget.from_params(dflash.to_params()) == dflash
    assert dflash.tensors == ("input_ids", "hidden_states")
    # EAGLE3: the same five keys as before the layout existed, and absent keys mean EAGLE3.
    eagle3 = capture_target(CaptureItem("r", "s", 3, (1,)), "st", plan_for("eagle3", [1, 3, 4], 8))
    assert eagle3.to_params() == {
        "version": 1,
        "store_id": "st",
        "run_id": "r",
        "sample_id": "s",
        "generation": 3,
    }
    assert wire.CaptureTarget.from_params(eagle3.to_params()).tensors == wire.PLUGIN_TENSORS


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("layers_tensor", "logits", "layers_tensor is 'logits'"),
        ("final_hidden", 0, "true or false"),
    ],
)
def test_a_bad_layout_is_named(field: str, value: Any, message: str) -> None:
    params = {**wire.CaptureTarget("st", "r", "s", 0).to_params(), field: value}
    with pytest.raises(wire.WireError, match=message):
        wire.CaptureTarget.from_params(params)


# -- the producer's checks -----------------------------------------------------------------------

H = 8
IDS = [3, 1, 4, 1, 5]
TARGET = wire.CaptureTarget("st", "run1", "s1", 2, "hidden_states", False)
EXPECTED = Expected("st", tuple(LAYERS), H, common_pb2.DTYPE_BFLOAT16, "hidden_states", False)


def dflash_ref(width: int = 3 * H, final: bool = False) -> dict[str, Any]:
    n = len(IDS)
    rows = [
        (wire.INPUT_IDS, common_pb2.DTYPE_INT64, [n], 8),
        (wire.HIDDEN_STATES, common_pb2.DTYPE_BFLOAT16, [n, width], 2),
    ]
    if final:
        rows.append((wire.HIDDEN_STATE, common_pb2.DTYPE_BFLOAT16, [n, H], 2))
    specs = [
        common_pb2.TensorSpec(
            name=name,
            dtype=dtype,
            shape=shape,
            nbytes=shape[0] * (shape[1] if len(shape) > 1 else 1) * size,
            key=make_key("st", "run1", "s1", 2, name),
            checksum=tensor_checksum(torch.tensor(IDS)) if name == wire.INPUT_IDS else 7,
        )
        for name, dtype, shape, size in rows
    ]
    return wire.ok_ref(TARGET, num_tokens=n, prompt_tokens=n, aux_layer_ids=LAYERS, specs=specs)


def test_a_sound_dflash_ref_is_accepted_in_plan_order() -> None:
    verdict = check_ref(dflash_ref(), TARGET, IDS, EXPECTED)
    assert verdict.ok, verdict.reason
    assert [s.name for s in verdict.specs] == ["input_ids", "hidden_states"]
    assert [k.rsplit("/", 1)[1] for k in expected_keys(TARGET)] == ["input_ids", "hidden_states"]


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        (
            dflash_ref(final=True),
            "ref holds tensors ['hidden_state', 'hidden_states', 'input_ids']",
        ),
        (dflash_ref(width=2 * H), "hidden_states is DTYPE_BFLOAT16 [5, 16], expected"),
    ],
)
def test_a_dflash_ref_off_the_plan_is_refused(ref: dict[str, Any], reason: str) -> None:
    verdict = check_ref(ref, TARGET, IDS, EXPECTED)
    assert not verdict.ok and reason in verdict.reason


def test_server_flags_follow_the_plans_convention() -> None:
    assert server_problems(fakes.capture_server_args(LAYERS, "dflash"), LAYERS, "dflash") == []
    [problem] = server_problems(fakes.capture_server_args(LAYERS), LAYERS, "dflash")
    assert "--speculative-algorithm must be DFLASH" in problem and "'eagle3'" in problem


# -- the engine ----------------------------------------------------------------------------------


@pytest.fixture
def dict_store() -> DictStore:
    return DictStore("st")


@pytest.fixture
def dflash_server(dict_store, hooked) -> Iterator[FakeSGLangServer]:  # type: ignore[no-untyped-def]
    install_on_fakes(dict_store)
    args = fakes.capture_server_args(LAYERS, "dflash")
    with FakeSGLangServer(HIDDEN, LAYERS, server_args=args) as server:
        yield server


def dflash_engine(model_dir: str, store: Any, url: str, algorithm: str = "dflash") -> SGLangEngine:
    return SGLangEngine(
        EngineConfig(model_path=model_dir, aux_layer_ids=tuple(LAYERS), algorithm=algorithm),
        SGLangOptions(store=store, server_urls=(url,)),
    )


@pytest.mark.parametrize("algorithm", ["dflash", "domino"])
def test_http_dflash_capture_returns_refs_in_plan_order(
    model_dir, dict_store, dflash_server, algorithm
) -> None:  # type: ignore[no-untyped-def]
    engine = dflash_engine(model_dir, dict_store, dflash_server.url, algorithm)
    prompts = {"p0": [1, 2, 3], "p1": [4, 5, 6, 7, 8]}
    outcomes = engine.capture_to_store(
        [CaptureItem("run1", k, 0, tuple(v)) for k, v in prompts.items()]
    )
    plan = engine.plan
    engine.close()

    assert (plan.layer_ids, plan.tensors) == (
        tuple(LAYERS),
        ("input_ids", "loss_mask", "hidden_states"),
    )
    body = dflash_server.bodies[-1]
    params = body["sampling_params"]["custom_params"][wire.REQUEST_KEY]
    assert (params["layers_tensor"], params["final_hidden"]) == ("hidden_states", False)
    assert body["return_hidden_states"] is True
    for outcome, ids in zip(outcomes, prompts.values(), strict=True):
        assert isinstance(outcome, CapturedRef)
        assert outcome.aux_layer_ids == tuple(LAYERS)
        assert [t.name for t in outcome.tensors] == [n for n in plan.tensors if n != "loss_mask"]
        got = dict_store.get_sample(list(outcome.tensors))
        assert got["input_ids"].tolist() == ids
        assert got["hidden_states"].equal(fakes.synthetic_features(ids, HIDDEN, LAYERS)[0])
    # Nothing but the plan's tensors was ever written (the probe's keys were removed).
    assert {k.rsplit("/", 1)[1] for k in dict_store.puts} == {"input_ids", "hidden_states"}
    assert sorted(dict_store.data) == sorted(
        k for s in prompts for k in keys_of(s, ("input_ids", "hidden_states"))
    )


def test_a_dflash_engine_refuses_an_eagle3_server(model_dir, dict_store, hooked) -> None:  # type: ignore[no-untyped-def]
    install_on_fakes(dict_store)
    with (
        FakeSGLangServer(HIDDEN, LAYERS) as server,
        pytest.raises(EngineError, match="--speculative-algorithm must be DFLASH"),
    ):
        dflash_engine(model_dir, dict_store, server.url)


def test_a_ref_naming_another_layouts_keys_has_them_removed(
    model_dir, dict_store, dflash_server
) -> None:  # type: ignore[no-untyped-def]
    engine = dflash_engine(model_dir, dict_store, dflash_server.url)
    dflash_server.mode = "extra_final"
    stray = make_key("st", "run1", "bad", 0, wire.HIDDEN_STATE)
    dict_store.data[stray] = torch.zeros(1)
    [outcome] = engine.capture_to_store([CaptureItem("run1", "bad", 0, (1, 2, 3))])
    engine.close()
    assert isinstance(outcome, CaptureFailure) and not outcome.retryable
    assert "ref holds tensors" in outcome.reason
    assert set(keys_of("bad", ("input_ids", "hidden_states", "hidden_state"))) <= set(
        dict_store.removed
    )
    assert not any("/bad/" in k for k in dict_store.data)


@pytest.mark.parametrize(("ids", "launched"), [(tuple(LAYERS), LAYERS), (None, [4])])
def test_in_process_dflash_launches_sglang_with_the_plans_layers(
    model_dir, dict_store, monkeypatch, ids, launched
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "sglang", fake_sglang)
    monkeypatch.setattr(fake_sglang, "open_store", lambda: dict_store)
    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    engine = SGLangEngine(
        EngineConfig(model_path=model_dir, aux_layer_ids=ids, algorithm="dflash"),
        SGLangOptions(store=dict_store, store_url="memory://st"),
    )
    [sglang_engine] = fake_sglang.Engine.instances[-1:]
    try:
        assert sglang_engine.kwargs["speculative_algorithm"] == "DFLASH"
        assert sglang_engine.kwargs["return_aux_hidden_state_layer_ids"] == launched
        assert sglang_engine.args["aux_hidden_state_capture"] == "dflash"
        [outcome] = engine.capture_to_store([CaptureItem("run1", "s", 0, (1, 2, 3, 4))])
    finally:
        engine.close()
    assert isinstance(outcome, CapturedRef)
    got = dict_store.get_sample(list(outcome.tensors))
    assert sorted(got) == ["hidden_states", "input_ids"]
    assert got["hidden_states"].equal(fakes.synthetic_features([1, 2, 3, 4], HIDDEN, launched)[0])
