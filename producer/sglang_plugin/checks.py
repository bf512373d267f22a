"""The producer's side of the contract: is the server launched for capture, and is a ref sound.

``server_problems`` reads SGLang's resolved server arguments (``/server_info`` or
``Engine.get_server_info()``) and names every flag that is not as capture needs it.
``check_ref`` holds a plugin ref against what the producer sent before anything is committed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from producer.sglang_plugin import wire
from services.api import common_pb2
from services.errors import InvalidArgument
from services.tensors import make_key, tensor_checksum, validate_specs


@dataclass(frozen=True)
class Expected:
    """What every ref of one producer must show."""

    store_id: str
    aux_layer_ids: tuple[int, ...]
    """The plan's layer ids, in order (the server's --return-aux-hidden-state-layer-ids)."""
    hidden_size: int
    dtype: int
    """``common_pb2.DType`` of the hidden-state tensors."""
    layers_tensor: str = wire.AUX_HIDDEN_STATE
    """The plan's name for the [L, K·H] concat of the layers."""
    final_hidden: bool = True
    """Whether the plan captures the post-norm final hidden state."""

    @property
    def tensors(self) -> tuple[str, ...]:
        """The tensors every ref must hold, in the order refs are handed on."""
        return wire.plugin_tensors(self.layers_tensor, self.final_hidden)


def server_problems(
    info: Mapping[str, Any], aux_layer_ids: Sequence[int], capture: str = "eagle3"
) -> list[str]:
    """One line per server flag that capture needs and the server does not have.

    ``capture`` is the SGLang capture convention the run's plan needs (``wire.CAPTURE_CONVENTIONS``
    of its layers tensor): ``eagle3`` or ``dflash``.
    """
    problems: list[str] = []

    def want(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    want(
        info.get("enable_return_aux_hidden_states") is True,
        "--enable-return-aux-hidden-states is off (capture-only aux mode)",
    )
    want(
        str(info.get("aux_hidden_state_capture") or "").lower() == capture,
        f"--speculative-algorithm must be {capture.upper()} with "
        "--enable-return-aux-hidden-states, the server resolved the capture convention to "
        f"{info.get('aux_hidden_state_capture')!r}",
    )
    layers = info.get("return_aux_hidden_state_layer_ids")
    want(
        layers is not None and list(layers) == list(aux_layer_ids),
        f"--return-aux-hidden-state-layer-ids is {layers!r}, the run captures "
        f"{list(aux_layer_ids)}: pass --return-aux-hidden-state-layer-ids "
        + " ".join(str(i) for i in aux_layer_ids),
    )
    want(
        info.get("chunked_prefill_size") == -1,
        f"--chunked-prefill-size is {info.get('chunked_prefill_size')!r}: pass "
        "--chunked-prefill-size -1 (a chunked prompt would be captured in pieces)",
    )
    want(
        info.get("skip_tokenizer_init") is True,
        "--skip-tokenizer-init is off: the producer sends token ids, never text",
    )
    want(
        info.get("return_hidden_states_mode") == "full",
        f"--return-hidden-states-mode is {info.get('return_hidden_states_mode')!r}, capture "
        "needs full (the default with --enable-return-aux-hidden-states)",
    )
    want(
        info.get("disable_overlap_schedule") is True,
        "--disable-overlap-schedule is off: with the overlap scheduler the next batch can "
        + (
            "overwrite the post-norm hidden rows before they are written"
            if capture == "eagle3"
            else "run while this batch's rows are read; the capture hooks follow the "
            "non-overlapped result path only"
        ),
    )
    want(info.get("pp_size", 1) == 1, f"--pp-size is {info.get('pp_size')!r}: capture needs 1")
    want(
        info.get("disaggregation_mode", "null") == "null",
        f"--disaggregation-mode is {info.get('disaggregation_mode')!r}: capture needs a "
        "combined prefill/decode server",
    )
    return problems


@dataclass(frozen=True)
class RefVerdict:
    """``specs`` when the ref is sound, else ``reason`` and whether a retry can help."""

    specs: tuple[common_pb2.TensorSpec, ...] = ()
    reason: str = ""
    retryable: bool = False

    @property
    def ok(self) -> bool:
        return not self.reason


def expected_keys(target: wire.CaptureTarget) -> list[str]:
    """The keys the plugin writes for ``target``: what to remove when a ref is refused."""
    return [
        make_key(target.store_id, target.run_id, target.sample_id, target.generation, name)
        for name in target.tensors
    ]


def check_ref(
    ref: Mapping[str, Any],
    target: wire.CaptureTarget,
    input_ids: Sequence[int],
    expected: Expected,
) -> RefVerdict:
    """Accept the ref only if it describes exactly the prompt the producer sent."""
    if ref.get("ok") is not True:
        return RefVerdict(
            reason=f"SGLang capture failed: {ref.get('error', 'no reason given')}",
            retryable=bool(ref.get("retryable", False)),
        )
    n = len(input_ids)
    sent = (target.store_id, target.run_id, target.sample_id, target.generation)
    got = (ref.get("store_id"), ref.get("run_id"), ref.get("sample_id"), ref.get("generation"))
    if got != sent:
        return RefVerdict(reason=f"ref names sample {got}, the request was for {sent}")
    if ref.get("num_tokens") != n or ref.get("prompt_tokens") != n:
        return RefVerdict(
            reason=f"captured {ref.get('num_tokens')} rows of a {ref.get('prompt_tokens')}-token "
            f"prompt, the producer sent {n} tokens"
        )
    layers = tuple(ref.get("aux_layer_ids") or ())
    if layers != expected.aux_layer_ids:
        return RefVerdict(
            reason=f"aux layers {list(layers)} differ from the run's {list(expected.aux_layer_ids)}"
        )
    try:
        specs = tuple(wire.spec_from_wire(t) for t in ref.get("tensors") or ())
        prefix = make_key(*sent, "")
        validate_specs(list(specs), "ref.tensors", key_prefix=prefix)
    except (wire.WireError, InvalidArgument) as exc:
        return RefVerdict(reason=f"malformed ref: {exc}")
    by_name = {s.name: s for s in specs}
    names = expected.tensors
    if sorted(by_name) != sorted(names):
        return RefVerdict(reason=f"ref holds tensors {sorted(by_name)}, expected {sorted(names)}")
    h = expected.hidden_size
    width = len(expected.aux_layer_ids) * h
    wanted = {
        wire.INPUT_IDS: (common_pb2.DTYPE_INT64, [n]),
        expected.layers_tensor: (expected.dtype, [n, width]),
    }
    if expected.final_hidden:
        wanted[wire.HIDDEN_STATE] = (expected.dtype, [n, h])
    for name, (dtype, shape) in wanted.items():
        spec = by_name[name]
        if spec.key != make_key(*sent, name):
            return RefVerdict(reason=f"{name} key {spec.key!r} is not {make_key(*sent, name)!r}")
        if spec.dtype != dtype or list(spec.shape) != shape:
            return RefVerdict(
                reason=f"{name} is {common_pb2.DType.Name(spec.dtype)} {list(spec.shape)}, "
                f"expected {common_pb2.DType.Name(dtype)} {shape}"
            )
    ids_sum = tensor_checksum(torch.tensor(list(input_ids), dtype=torch.int64))
    if by_name[wire.INPUT_IDS].checksum != ids_sum:
        return RefVerdict(reason="the captured input_ids differ from the prompt the producer sent")
    return RefVerdict(specs=tuple(by_name[name] for name in names))
