"""What the producer and the plugin exchange through SGLang's request and response.

Request: the capture target rides in ``sampling_params.custom_params[REQUEST_KEY]``, a field SGLang
carries untouched from the HTTP/Engine request to the scheduler's ``Req.sampling_params`` (its
values must be JSON scalars, which is why the target is a flat dict). The target also names the
run's capture layout (``services.capture.CapturePlan``): the name of the concatenated-layers
tensor and whether the post-norm final hidden state is written. Both keys are left out for
EAGLE3's layout (``aux_hidden_state`` plus ``hidden_state``), the only one protocol 1 started
with, so an EAGLE3 request is the same bytes as before.

Response: the plugin sets ``req.customized_info[RESPONSE_KEY] = [ref]``; SGLang ships
``customized_info`` pickled to the tokenizer manager, which puts it in
``meta_info[RESPONSE_KEY]`` (one entry per output token; capture requests produce exactly one).
A ref is either ``{"ok": True, ...specs...}`` or ``{"ok": False, "error": ..., "retryable": ...}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.api import common_pb2
from services.capture import DFLASH_LAYERS_TENSOR, EAGLE3_LAYERS_TENSOR, FINAL_HIDDEN_TENSOR

PROTOCOL_VERSION = 1
REQUEST_KEY = "draftflow_capture"
RESPONSE_KEY = "draftflow_ref"
AUX_HIDDEN_STATE = EAGLE3_LAYERS_TENSOR
HIDDEN_STATES = DFLASH_LAYERS_TENSOR
HIDDEN_STATE = FINAL_HIDDEN_TENSOR
INPUT_IDS = "input_ids"
# The tensors the plugin writes for EAGLE3, in buffer and response order.
PLUGIN_TENSORS = (INPUT_IDS, AUX_HIDDEN_STATE, HIDDEN_STATE)
# SGLang's capture convention (``--speculative-algorithm`` with --enable-return-aux-hidden-states,
# resolved into ``server_args.aux_hidden_state_capture``) behind each layers tensor. Both map a
# layer id i to the output of decoder layer i and concatenate in ascending layer order.
CAPTURE_CONVENTIONS = {AUX_HIDDEN_STATE: "eagle3", HIDDEN_STATES: "dflash"}


def plugin_tensors(layers_tensor: str, final_hidden: bool) -> tuple[str, ...]:
    """The tensors the plugin writes for a layout, in buffer and response order."""
    return (INPUT_IDS, layers_tensor, *((HIDDEN_STATE,) if final_hidden else ()))


class WireError(ValueError):
    """A request or response field does not follow the capture protocol."""


@dataclass(frozen=True)
class CaptureTarget:
    """Where one prompt's features go: the key prefix of ``services.tensors.make_key``."""

    store_id: str
    run_id: str
    sample_id: str
    generation: int
    layers_tensor: str = AUX_HIDDEN_STATE
    """Name of the [L, K·H] concat of the captured layers (the plan's ``layers_tensor``)."""
    final_hidden: bool = True
    """Whether the post-norm final hidden state is written too (the plan's ``final_hidden``)."""

    @property
    def tensors(self) -> tuple[str, ...]:
        """What the plugin writes for this target, in buffer and response order."""
        return plugin_tensors(self.layers_tensor, self.final_hidden)

    def to_params(self) -> dict[str, str | int | bool]:
        """The flat dict sent as ``custom_params[REQUEST_KEY]``."""
        params: dict[str, str | int | bool] = {
            "version": PROTOCOL_VERSION,
            "store_id": self.store_id,
            "run_id": self.run_id,
            "sample_id": self.sample_id,
            "generation": self.generation,
        }
        if (self.layers_tensor, self.final_hidden) != (AUX_HIDDEN_STATE, True):
            params["layers_tensor"] = self.layers_tensor
            params["final_hidden"] = self.final_hidden
        return params

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> CaptureTarget:
        """Parse ``custom_params[REQUEST_KEY]``; raise ``WireError`` naming the bad field."""
        if params.get("version") != PROTOCOL_VERSION:
            raise WireError(
                f"{REQUEST_KEY}.version is {params.get('version')!r}, this plugin speaks "
                f"{PROTOCOL_VERSION}: install the same draftflow version in the producer and "
                "the SGLang server"
            )
        for name in ("store_id", "run_id", "sample_id"):
            value = params.get(name)
            if not isinstance(value, str) or not value or "/" in value:
                raise WireError(f"{REQUEST_KEY}.{name}: must be a non-empty string without '/'")
        generation = params.get("generation")
        if not isinstance(generation, int) or isinstance(generation, bool) or generation < 0:
            raise WireError(f"{REQUEST_KEY}.generation: must be an integer >= 0")
        layers_tensor = params.get("layers_tensor", AUX_HIDDEN_STATE)
        if layers_tensor not in CAPTURE_CONVENTIONS:
            raise WireError(
                f"{REQUEST_KEY}.layers_tensor is {layers_tensor!r}, this plugin writes one of "
                f"{sorted(CAPTURE_CONVENTIONS)}: install the same draftflow version in the "
                "producer and the SGLang server"
            )
        final_hidden = params.get("final_hidden", True)
        if not isinstance(final_hidden, bool):
            raise WireError(f"{REQUEST_KEY}.final_hidden: must be true or false")
        return cls(
            params["store_id"],
            params["run_id"],
            params["sample_id"],
            generation,
            layers_tensor,
            final_hidden,
        )


def spec_to_wire(spec: common_pb2.TensorSpec) -> dict[str, Any]:
    """A ``TensorSpec`` as plain data (the response path pickles it; HTTP turns it into JSON)."""
    return {
        "name": spec.name,
        "dtype": common_pb2.DType.Name(spec.dtype),
        "shape": list(spec.shape),
        "nbytes": spec.nbytes,
        "key": spec.key,
        "checksum": spec.checksum,
    }


def spec_from_wire(data: Mapping[str, Any]) -> common_pb2.TensorSpec:
    """Inverse of ``spec_to_wire``; raise ``WireError`` on a malformed entry."""
    try:
        return common_pb2.TensorSpec(
            name=str(data["name"]),
            dtype=common_pb2.DType.Value(str(data["dtype"])),
            shape=[int(d) for d in data["shape"]],
            nbytes=int(data["nbytes"]),
            key=str(data["key"]),
            checksum=int(data["checksum"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"malformed tensor entry {dict(data)!r}: {exc}") from exc


def ok_ref(
    target: CaptureTarget,
    *,
    num_tokens: int,
    prompt_tokens: int,
    aux_layer_ids: Sequence[int],
    specs: Sequence[common_pb2.TensorSpec],
) -> dict[str, Any]:
    """The response entry for a prompt whose features are in the store."""
    return {
        "version": PROTOCOL_VERSION,
        "ok": True,
        "store_id": target.store_id,
        "run_id": target.run_id,
        "sample_id": target.sample_id,
        "generation": target.generation,
        "num_tokens": num_tokens,
        "prompt_tokens": prompt_tokens,
        "aux_layer_ids": list(aux_layer_ids),
        "tensors": [spec_to_wire(s) for s in specs],
    }


def error_ref(error: str, *, retryable: bool) -> dict[str, Any]:
    """The response entry for a prompt whose capture failed; nothing of it is in the store."""
    return {"version": PROTOCOL_VERSION, "ok": False, "error": error, "retryable": retryable}


def ref_from_meta_info(meta_info: Mapping[str, Any]) -> dict[str, Any]:
    """Pull the plugin's single entry out of a ``/generate`` response's ``meta_info``."""
    entries = meta_info.get(RESPONSE_KEY)
    if entries is None:
        raise WireError(
            f"the response has no meta_info.{RESPONSE_KEY}: the draftflow SGLang plugin is not "
            "active in that server (install draftflow in the server's environment and check its "
            "log for 'draftflow_capture')"
        )
    if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
        raise WireError(
            f"meta_info.{RESPONSE_KEY} must hold exactly one ref, got {entries!r}: send "
            "max_new_tokens=1"
        )
    return entries[0]
