"""The capture plan: which target layers a run captures and which tensors a sample holds.

Each draft strategy needs different features from the target, so the plan follows the run's
``draft.algorithm``: EAGLE3 reads three aux layers plus the final (post-norm) hidden state; the
DFlash family reads K layers concatenated into ``hidden_states`` and no final state. Producers
(hf and SGLang engines alike) capture from the plan, refs carry it, and the coordinator and the
trainer check samples against it. Layer ids follow one convention everywhere: id ``i`` names the
*output* of decoder layer ``i`` (transformers' ``hidden_states[i + 1]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.api import common_pb2

EAGLE3 = "eagle3"
DFLASH_FAMILY = ("dflash", "domino")
ALGORITHMS = (EAGLE3, *DFLASH_FAMILY)
"""Every draft algorithm a run may name; the trainer's registry holds one strategy for each."""

EAGLE3_LAYERS_TENSOR = "aux_hidden_state"
DFLASH_LAYERS_TENSOR = "hidden_states"
FINAL_HIDDEN_TENSOR = "hidden_state"
TOKEN_TENSORS = ("input_ids", "loss_mask")


class CapturePlanError(ValueError):
    """The layer ids or the algorithm cannot be captured; the message says what to change."""


@dataclass(frozen=True)
class CapturePlan:
    """What a producer captures for one run."""

    layer_ids: tuple[int, ...]
    """Target layers whose outputs are concatenated, in this order, into ``layers_tensor``."""
    layers_tensor: str
    """Name of the ``[L, K·H]`` tensor of concatenated layer outputs."""
    final_hidden: bool
    """Whether the final hidden state (after the model's last norm) is captured too."""

    @property
    def tensors(self) -> tuple[str, ...]:
        """Every tensor a sample of this plan holds, in store order."""
        final = (FINAL_HIDDEN_TENSOR,) if self.final_hidden else ()
        return (*TOKEN_TENSORS, self.layers_tensor, *final)

    @property
    def needs_supervised_pair(self) -> bool:
        """Whether a sample needs two consecutive trained tokens (a DFlash anchor and the token
        after it); a prompt without them cannot be trained on."""
        return self.layers_tensor == DFLASH_LAYERS_TENSOR

    def to_proto(self) -> common_pb2.CapturePlan:
        return common_pb2.CapturePlan(layer_ids=list(self.layer_ids),
                                      layers_tensor=self.layers_tensor,
                                      final_hidden=self.final_hidden)

    @classmethod
    def from_proto(cls, msg: common_pb2.CapturePlan) -> CapturePlan:
        return cls(tuple(msg.layer_ids), msg.layers_tensor, msg.final_hidden)


def default_layer_ids(algorithm: str, num_layers: int, draft_layers: int = 1) -> list[int]:
    """The layers a run captures when its config names none."""
    if algorithm == EAGLE3:
        return [1, num_layers // 2 - 1, num_layers - 4]
    return build_target_layer_ids(num_layers, draft_layers)


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """DFlash's default capture layers: the middle layer for one draft layer, else evenly from
    1 to N-3 (Python's rounding, as SGLang and the reference draft compute it)."""
    n, d = num_target_layers, num_draft_layers
    if d < 1:
        raise CapturePlanError(f"draft layers must be >= 1, got {d}")
    if d == 1:
        return [n // 2]
    if n < 4:
        raise CapturePlanError(f"a {n}-layer target is too shallow for {d} draft layers; "
                               "use one draft layer or set draft.target_layer_ids")
    return [round(1 + i * (n - 4) / (d - 1)) for i in range(d)]


def validate_layer_ids(ids: Sequence[int], num_layers: int, field: str,
                       count: int | None = None) -> None:
    """Unique, ascending ids in [0, N-2]: SGLang concatenates captured layers in ascending order,
    and the last layer's output is the post-norm final state, not a layer feature."""
    ids = list(ids)
    if not ids:
        raise CapturePlanError(f"{field} is empty; name at least one target layer")
    if count is not None and len(ids) != count:
        raise CapturePlanError(f"{field} must list {count} layer ids, got {ids}")
    if len(set(ids)) != len(ids):
        raise CapturePlanError(f"{field} {ids} repeats a layer; every id must be distinct")
    bad = [i for i in ids if i < 0 or i >= num_layers - 1]
    if bad:
        raise CapturePlanError(
            f"{field} {bad} out of range: the target has {num_layers} layers, "
            f"so ids must be in [0, {num_layers - 2}]")
    if ids != sorted(ids):
        raise CapturePlanError(
            f"{field} {ids} must be ascending ({sorted(ids)}): SGLang captures layers in "
            "ascending order")


def plan_for(algorithm: str, layer_ids: Sequence[int], num_layers: int) -> CapturePlan:
    """The validated plan of a run drafting with ``algorithm`` from ``layer_ids``."""
    if algorithm == EAGLE3:
        validate_layer_ids(layer_ids, num_layers, "capture.aux_layer_ids", count=3)
        return CapturePlan(tuple(layer_ids), EAGLE3_LAYERS_TENSOR, final_hidden=True)
    if algorithm in DFLASH_FAMILY:
        validate_layer_ids(layer_ids, num_layers, "draft.target_layer_ids")
        return CapturePlan(tuple(layer_ids), DFLASH_LAYERS_TENSOR, final_hidden=False)
    raise CapturePlanError(
        f"draft.algorithm {algorithm!r} is unknown; use one of: {', '.join(ALGORITHMS)}")
