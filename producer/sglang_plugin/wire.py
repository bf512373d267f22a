"""What the producer and the plugin exchange through SGLang's request and response.

Request: the capture target rides in ``sampling_params.custom_params[REQUEST_KEY]``, a field SGLang
carries untouched from the HTTP/Engine request to the scheduler's ``Req.sampling_params`` (its
values must be JSON scalars, which is why the target is a flat dict).

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

PROTOCOL_VERSION = 1
REQUEST_KEY = "draftflow_capture"
RESPONSE_KEY = "draftflow_ref"
AUX_HIDDEN_STATE = "aux_hidden_state"
HIDDEN_STATE = "hidden_state"
INPUT_IDS = "input_ids"
# The tensors the plugin writes, in buffer and response order.
PLUGIN_TENSORS = (INPUT_IDS, AUX_HIDDEN_STATE, HIDDEN_STATE)


class WireError(ValueError):
    """A request or response field does not follow the capture protocol."""


@dataclass(frozen=True)
class CaptureTarget:
    """Where one prompt's features go: the key prefix of DESIGN.md section 7."""

    store_id: str
    run_id: str
    sample_id: str
    generation: int

    def to_params(self) -> dict[str, str | int]:
        """The flat dict sent as ``custom_params[REQUEST_KEY]``."""
        return {
            "version": PROTOCOL_VERSION,
            "store_id": self.store_id,
            "run_id": self.run_id,
            "sample_id": self.sample_id,
            "generation": self.generation,
        }

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
        return cls(params["store_id"], params["run_id"], params["sample_id"], generation)


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
