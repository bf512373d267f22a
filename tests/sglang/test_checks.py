"""The producer-side checks: server flags and ref verification, one rule per test."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from producer.sglang_plugin import wire
from producer.sglang_plugin.checks import Expected, check_ref, server_problems
from services.api import common_pb2
from services.tensors import make_key, tensor_checksum
from tests.sglang import fakes

IDS = [3, 1, 4, 1, 5]
H = 8
TARGET = wire.CaptureTarget("st", "run1", "s1", 2)
EXPECTED = Expected("st", (1, 3, 4), H, common_pb2.DTYPE_BFLOAT16)


def good_ref() -> dict[str, Any]:
    n = len(IDS)
    specs = []
    for name, dtype, shape, size in (
        (wire.INPUT_IDS, common_pb2.DTYPE_INT64, [n], 8),
        (wire.AUX_HIDDEN_STATE, common_pb2.DTYPE_BFLOAT16, [n, 3 * H], 2),
        (wire.HIDDEN_STATE, common_pb2.DTYPE_BFLOAT16, [n, H], 2),
    ):
        numel = 1
        for d in shape:
            numel *= d
        checksum = (
            tensor_checksum(torch.tensor(IDS, dtype=torch.int64)) if name == wire.INPUT_IDS else 7
        )
        specs.append(
            common_pb2.TensorSpec(
                name=name,
                dtype=dtype,
                shape=shape,
                nbytes=numel * size,
                key=make_key("st", "run1", "s1", 2, name),
                checksum=checksum,
            )
        )
    return wire.ok_ref(TARGET, num_tokens=n, prompt_tokens=n, aux_layer_ids=[1, 3, 4], specs=specs)


def test_a_sound_ref_is_accepted_with_its_specs_in_order() -> None:
    verdict = check_ref(good_ref(), TARGET, IDS, EXPECTED)
    assert verdict.ok
    assert [s.name for s in verdict.specs] == list(wire.PLUGIN_TENSORS)


def tensor(ref: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in ref["tensors"] if t["name"] == name)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda r: r.update(generation=1), "ref names sample"),
        (lambda r: r.update(prompt_tokens=4), "of a 4-token prompt"),
        (
            lambda r: tensor(r, wire.HIDDEN_STATE).update(dtype="DTYPE_FLOAT16"),
            "hidden_state is DTYPE_FLOAT16 [5, 8], expected DTYPE_BFLOAT16 [5, 8]",
        ),
        (
            lambda r: tensor(r, wire.AUX_HIDDEN_STATE).update(shape=[5, 16], nbytes=160),
            "aux_hidden_state is DTYPE_BFLOAT16 [5, 16], expected DTYPE_BFLOAT16 [5, 24]",
        ),
        (
            lambda r: tensor(r, wire.HIDDEN_STATE).update(key="st/run1/other/g2/hidden_state"),
            "outside the prefix",
        ),
        (lambda r: tensor(r, wire.HIDDEN_STATE).update(nbytes=3), "nbytes"),
        (
            lambda r: tensor(r, wire.INPUT_IDS).update(checksum=1),
            "input_ids differ from the prompt",
        ),
        (lambda r: r["tensors"].pop(), "ref holds tensors"),
    ],
)
def test_a_ref_that_differs_from_the_request_is_refused_for_good(tamper, reason) -> None:
    ref = good_ref()
    tamper(ref)
    verdict = check_ref(ref, TARGET, IDS, EXPECTED)
    assert not verdict.ok and not verdict.retryable
    assert reason in verdict.reason


def test_a_plugin_error_keeps_its_retryability() -> None:
    verdict = check_ref(wire.error_ref("pool full", retryable=True), TARGET, IDS, EXPECTED)
    assert not verdict.ok and verdict.retryable and "pool full" in verdict.reason


def test_a_server_launched_for_capture_has_no_problems() -> None:
    assert server_problems(fakes.capture_server_args([1, 3, 4]), [1, 3, 4]) == []


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("enable_return_aux_hidden_states", False, "--enable-return-aux-hidden-states"),
        ("aux_hidden_state_capture", "dflash", "--speculative-algorithm must be EAGLE3"),
        ("return_aux_hidden_state_layer_ids", None, "--return-aux-hidden-state-layer-ids 1 3 4"),
        ("chunked_prefill_size", 4096, "--chunked-prefill-size -1"),
        ("skip_tokenizer_init", False, "--skip-tokenizer-init"),
        ("return_hidden_states_mode", "last", "--return-hidden-states-mode"),
        ("disable_overlap_schedule", False, "--disable-overlap-schedule"),
        ("pp_size", 2, "--pp-size"),
        ("disaggregation_mode", "prefill", "--disaggregation-mode"),
    ],
)
def test_each_missing_flag_is_named(field: str, value: Any, flag: str) -> None:
    info = {**fakes.capture_server_args([1, 3, 4]), field: value}
    [problem] = server_problems(info, [1, 3, 4])
    assert flag in problem


def test_the_target_round_trips_and_bad_targets_are_named() -> None:
    assert wire.CaptureTarget.from_params(TARGET.to_params()) == TARGET
    with pytest.raises(wire.WireError, match="sample_id"):
        wire.CaptureTarget.from_params({**TARGET.to_params(), "sample_id": "a/b"})
    with pytest.raises(wire.WireError, match="same draftflow version"):
        wire.CaptureTarget.from_params({**TARGET.to_params(), "version": 99})
