"""Stand-ins for the SGLang 0.5.23 objects the capture plugin touches.

Each class carries the real class's name, field list and method signatures (``test_source``
holds them against SGLang's source when it is present), and behaves as the real one does on the
path capture uses: the result processor walks a prefill batch, advancing a row offset per
request and calling ``_append_prefill_hidden_states``, then streams the batch; the streamer
ships ``customized_info`` pickled, as SGLang does over its IPC; ``tokenizer_side`` builds the
``meta_info`` a ``/generate`` caller sees.

``FakeScheduler`` puts them together behind ``run(requests)``: ``GenerateReqInput``-shaped dicts
in, ``/generate``-shaped responses out. Its hidden states come from a fake target
(``layer_outputs``) captured the way SGLang's Llama/Qwen3 hooks capture in capture-only aux mode
(``layers_to_capture``, ``captured_layers``); ``synthetic_features`` is the independent answer a
test expects: the outputs of the named layers in HF's convention, and the final state.
"""

from __future__ import annotations

import dataclasses
import pickle
from array import array
from collections.abc import Callable
from enum import IntEnum
from types import SimpleNamespace
from typing import Any, ClassVar

import torch

# -- sglang.srt.model_executor.forward_batch_info ------------------------------------------------


class CaptureHiddenMode(IntEnum):
    NULL = 0
    LAST = 1
    FULL = 2

    def need_capture(self) -> bool:
        return self != CaptureHiddenMode.NULL

    def is_full(self) -> bool:
        return self == CaptureHiddenMode.FULL

    def is_last(self) -> bool:
        return self == CaptureHiddenMode.LAST


# -- sglang.srt.layers.logits_processor ----------------------------------------------------------


@dataclasses.dataclass
class LogitsProcessorOutput:
    next_token_logits: torch.Tensor | None
    hidden_states: torch.Tensor | None = None
    hidden_states_token_indices: torch.Tensor | None = None
    last_hidden_states: torch.Tensor | None = None
    customized_info: dict[str, list[Any]] | None = None


# -- sglang.srt.sampling.sampling_params / managers.schedule_batch -------------------------------


@dataclasses.dataclass(kw_only=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    ignore_eos: bool = False
    custom_params: dict[str, Any] | None = None


class FINISH_LENGTH:
    def __init__(self, length: int) -> None:
        self.length = length

    def to_json(self) -> dict[str, Any]:
        return {"type": "length", "length": self.length}


class Req:
    """The attributes of ``schedule_batch.Req`` that capture reads or writes."""

    def __init__(
        self,
        rid: str,
        origin_input_text: str,
        origin_input_ids: array,
        sampling_params: SamplingParams,
        return_hidden_states: Any = False,
        cache_salt: str | None = None,
    ) -> None:
        self.rid = rid
        self.origin_input_ids = origin_input_ids
        self.sampling_params = sampling_params
        self.return_hidden_states = return_hidden_states
        self.cache_salt = cache_salt
        self.output_ids = array("q")
        self.hidden_states: list[list[float]] = []
        self.customized_info: dict[str, list[Any]] | None = None
        self.finished_reason: Any = None
        self.finished_len: int | None = None
        self.is_retracted = False
        self.inflight_middle_chunks = 0
        self.send_token_offset = 0

    def finished(self) -> bool:
        return self.finished_reason is not None


@dataclasses.dataclass
class ScheduleBatch:
    reqs: list[Req]
    return_hidden_states: bool = False
    return_logprob: bool = False


@dataclasses.dataclass
class GenerationBatchResult:
    logits_output: LogitsProcessorOutput | None = None
    next_token_ids: torch.Tensor | None = None
    extend_input_len_per_req: list[int] | None = None
    copy_done: Any = None


# -- sglang.srt.managers.scheduler_components ----------------------------------------------------


class SenderWrapper:
    """``socket`` is a list standing in for the ZMQ socket; None on ranks that do not send."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket

    def send_output(self, output: Any, recv_obj: object | None = None) -> None:
        if self.socket is None:
            return
        self.socket.append(output)


@dataclasses.dataclass(kw_only=True, slots=True)
class SchedulerOutputStreamer:
    has_additional_customized_info: ClassVar[bool] = False

    send_to_detokenizer: SenderWrapper
    tree_cache: Any = None
    server_args: Any = None
    is_generation: bool = True
    spec_algorithm: Any = None
    disaggregation_mode: Any = None
    enable_hicache_storage: Callable[[], bool] = lambda: False
    rust_server: Any = None
    _test_stream_output_count: int = 0

    def stream_output(
        self, reqs: list[Req], return_logprob: bool, skip_req: Req | None = None
    ) -> None:
        """Send finished requests' outputs; ``customized_info`` travels pickled."""
        sent = [r for r in reqs if r is not skip_req and r.finished()]
        if not sent:
            return
        offsets = [r.send_token_offset for r in sent]
        keys = sorted({k for r in sent for k in (r.customized_info or {})})
        custom = {
            key: [
                (r.customized_info or {}).get(key, [None] * len(r.output_ids))[o:]
                for r, o in zip(sent, offsets, strict=True)
            ]
            for key in keys
        }
        payload = {
            "rids": [r.rid for r in sent],
            "finished_reasons": [r.finished_reason.to_json() for r in sent],
            "output_ids": [list(r.output_ids[o:]) for r, o in zip(sent, offsets, strict=True)],
            "prompt_tokens": [len(r.origin_input_ids) for r in sent],
            "output_hidden_states": [
                r.hidden_states if r.return_hidden_states else None for r in sent
            ],
            "customized_info": pickle.dumps(custom) if custom else None,
        }
        for r in sent:
            r.send_token_offset = len(r.output_ids)
        self.send_to_detokenizer.send_output(payload)


@dataclasses.dataclass(kw_only=True, slots=True, frozen=True)
class SchedulerBatchResultProcessor:
    is_generation: bool = True
    disaggregation_mode: Any = None
    enable_overlap: bool = False
    enable_overlap_mlx: bool = False
    model_config: Any = None
    token_to_kv_pool_allocator: Any = None
    tree_cache: Any = None
    hisparse_coordinator: Any = None
    req_to_token_pool: Any = None
    decode_offload_manager: Any = None
    metrics_collector: Any = None
    metrics_reporter: Any = None
    draft_worker: Any = None
    model_worker: Any = None
    logprob_result_processor: Any = None
    output_streamer: SchedulerOutputStreamer
    beam_coordinator: Any = None
    abort_request: Any = None

    def process_batch_result_prefill(
        self, batch: ScheduleBatch, result: GenerationBatchResult
    ) -> None:
        logits_output = result.logits_output
        next_token_ids = result.next_token_ids.tolist()
        # The server runs in full hidden-state mode (--enable-return-aux-hidden-states).
        mode = CaptureHiddenMode.FULL
        offset = 0
        for i, (req, token) in enumerate(zip(batch.reqs, next_token_ids, strict=True)):
            commit = not req.finished() and not req.is_retracted
            if batch.return_hidden_states and logits_output.hidden_states is not None:
                offset = self._append_prefill_hidden_states(
                    req=req,
                    logits_output=logits_output,
                    hidden_state_offset=offset,
                    capture_hidden_mode=mode,
                    extend_input_len=result.extend_input_len_per_req[i],
                    store=commit,
                )
            if not commit:
                continue
            req.output_ids.append(token)
            if len(req.output_ids) >= req.sampling_params.max_new_tokens:
                req.finished_reason = FINISH_LENGTH(len(req.output_ids))
                req.finished_len = len(req.output_ids)
        self.output_streamer.stream_output(batch.reqs, batch.return_logprob, None)

    def _append_prefill_hidden_states(
        self,
        *,
        req: Req,
        logits_output: LogitsProcessorOutput,
        hidden_state_offset: int,
        capture_hidden_mode: CaptureHiddenMode,
        extend_input_len: int,
        store: bool = True,
    ) -> int:
        if capture_hidden_mode.is_full():
            begin, end = hidden_state_offset, hidden_state_offset + extend_input_len
            if store and req.return_hidden_states:
                rows = logits_output.hidden_states[begin:end]
                if req.return_hidden_states == "last":
                    req.hidden_states.append(rows[-1].cpu().tolist())
                else:
                    req.hidden_states.append(rows.cpu().clone().tolist())
            return end
        if capture_hidden_mode.is_last():
            if store and req.return_hidden_states:
                req.hidden_states.append(
                    logits_output.hidden_states[hidden_state_offset].cpu().tolist()
                )
            return hidden_state_offset + 1
        raise ValueError(f"Unexpected hidden states capture mode: {capture_hidden_mode}")


# -- the tokenizer manager's view, and a whole scheduler -----------------------------------------


def tokenizer_side(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """``/generate`` responses for one streamed batch, as the tokenizer manager builds them."""
    custom = pickle.loads(payload["customized_info"]) if payload.get("customized_info") else {}
    responses = []
    for i, rid in enumerate(payload["rids"]):
        meta: dict[str, Any] = {
            "id": rid,
            "finish_reason": payload["finished_reasons"][i],
            "prompt_tokens": payload["prompt_tokens"][i],
        }
        for key, column in custom.items():
            meta[key] = list(column[i])
        if payload["output_hidden_states"][i] is not None:
            meta["hidden_states"] = payload["output_hidden_states"][i]
        responses.append({"output_ids": payload["output_ids"][i], "meta_info": meta})
    return responses


NUM_LAYERS = 8
"""Decoder layers of the fake target (the tests' model directories have 8 as well)."""


def _grid(input_ids: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.tensor(input_ids, dtype=torch.float32)[:, None]
    pos = torch.arange(len(input_ids), dtype=torch.float32)[:, None]
    cols = torch.arange(width, dtype=torch.float32)[None, :]
    return ids, pos, cols


def layer_outputs(
    input_ids: list[int],
    hidden_size: int,
    num_layers: int = NUM_LAYERS,
    dtype: torch.dtype = torch.bfloat16,
) -> list[torch.Tensor]:
    """The fake target's residual stream in HF's ``hidden_states`` layout: ``[0]`` the
    embeddings, ``[i + 1]`` the output of decoder layer ``i`` (each [L, H], all different)."""
    ids, pos, cols = _grid(input_ids, hidden_size)
    return [
        torch.sin(ids * 0.37 + pos * 0.11 + cols * 0.013 + j * 0.71).to(dtype)
        for j in range(num_layers + 1)
    ]


def final_hidden_state(
    input_ids: list[int], hidden_size: int, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The fake target's final hidden state after its last norm [L, H]."""
    ids, pos, cols = _grid(input_ids, hidden_size)
    return torch.cos(ids * 0.29 + pos * 0.07 + cols * 0.017).to(dtype)


def layers_to_capture(
    layer_ids: list[int] | None, num_layers: int, capture: str = "eagle3"
) -> list[int]:
    """``set_eagle3_layers_to_capture`` / ``set_dflash_layers_to_capture`` of SGLang's Llama and
    Qwen3 (``test_source`` holds them against the source): SGLang captures the *input* of a
    layer, so the output of layer ``i`` is captured before layer ``i + 1``."""
    if layer_ids is None:
        if capture != "eagle3":
            raise ValueError("DFLASH requires explicit layer_ids for aux hidden capture.")
        return [2, num_layers // 2, num_layers - 3]
    return [i + 1 for i in layer_ids]


def captured_layers(
    layer_inputs: list[torch.Tensor], capture_points: list[int], num_layers: int
) -> torch.Tensor:
    """The model's forward in capture mode, then the logits processor's packing: layer ``i``'s
    input is captured when ``i`` is a capture point, in layer order whatever the order of the
    points; the captures are concatenated along the last dim. ``layer_inputs[i]`` is the input
    of layer ``i`` (the HF ``hidden_states[i]``)."""
    captured = [layer_inputs[i] for i in range(num_layers) if i in capture_points]
    if len(captured) != len(capture_points):
        # LogitsProcessor._check_aux_hidden_states: the last layer's output is never captured.
        raise ValueError(
            f"The model captured {len(captured)} aux hidden states, but "
            f"--return-aux-hidden-state-layer-ids names {len(capture_points)} layers."
        )
    return captured[0] if len(captured) == 1 else torch.cat(captured, dim=-1)


def synthetic_features(
    input_ids: list[int],
    hidden_size: int,
    layer_ids: list[int] | tuple[int, ...],
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a capture of ``layer_ids`` must hold: the outputs of those layers (HF's
    ``hidden_states[i + 1]``) concatenated in the given order [L, K*H], and the final state."""
    outputs = layer_outputs(input_ids, hidden_size, dtype=dtype)
    layers = torch.cat([outputs[i + 1] for i in layer_ids], dim=-1)
    return layers, final_hidden_state(input_ids, hidden_size, dtype)


def capture_server_args(aux_layer_ids: list[int], capture: str = "eagle3") -> dict[str, Any]:
    """``/server_info`` fields of a server launched for capture (as SGLang resolves them);
    ``capture`` is the convention ``--speculative-algorithm`` named (eagle3 or dflash)."""
    return {
        "version": "0.5.23",
        "model_path": "/models/target",
        "enable_return_aux_hidden_states": True,
        "aux_hidden_state_capture": capture,
        "speculative_algorithm": None,
        "return_aux_hidden_state_layer_ids": list(aux_layer_ids),
        "chunked_prefill_size": -1,
        "disable_radix_cache": True,
        "skip_tokenizer_init": True,
        "return_hidden_states_mode": "full",
        "enable_return_hidden_states": False,
        "disable_overlap_schedule": True,
        "pp_size": 1,
        "tp_size": 1,
        "disaggregation_mode": "null",
        "dtype": "auto",
    }


class FakeScheduler:
    """One scheduler process: a result processor and streamer on the (hooked) fake classes."""

    def __init__(
        self,
        hidden_size: int,
        aux_layer_ids: list[int],
        *,
        sends: bool = True,
        server_args: dict[str, Any] | None = None,
        cached_prefix: int = 0,
        device: str = "cpu",
        capture: str = "eagle3",
        num_layers: int = NUM_LAYERS,
    ) -> None:
        self.hidden_size = hidden_size
        self.aux_layer_ids = list(aux_layer_ids)
        self.args = server_args or capture_server_args(aux_layer_ids, capture)
        self.num_layers = num_layers
        # What the model runner configures at start (configure_aux_hidden_state_capture).
        self.capture_points = layers_to_capture(
            self.aux_layer_ids, num_layers, self.args.get("aux_hidden_state_capture") or "eagle3"
        )
        self.socket: list[dict[str, Any]] | None = [] if sends else None
        self.streamer = SchedulerOutputStreamer(
            send_to_detokenizer=SenderWrapper(self.socket), server_args=SimpleNamespace(**self.args)
        )
        self.processor = SchedulerBatchResultProcessor(output_streamer=self.streamer)
        # Rows a prefix-cache hit would skip: the forward covers only the rest of the prompt.
        self.cached_prefix = cached_prefix
        # Where the forward's outputs live: "cuda" on a GPU machine, as in SGLang.
        self.device = device
        self.batches = 0

    def build(self, requests: list[dict[str, Any]]) -> tuple[ScheduleBatch, GenerationBatchResult]:
        """The batch and forward result SGLang would hold after prefilling ``requests``."""
        reqs, aux_rows, hidden_rows, extend = [], [], [], []
        for body in requests:
            sp = body.get("sampling_params") or {}
            ids = list(body["input_ids"])
            reqs.append(
                Req(
                    body["rid"],
                    "",
                    array("q", ids),
                    SamplingParams(
                        max_new_tokens=sp.get("max_new_tokens", 128),
                        temperature=sp.get("temperature", 1.0),
                        ignore_eos=sp.get("ignore_eos", False),
                        custom_params=sp.get("custom_params"),
                    ),
                    return_hidden_states=body.get("return_hidden_states", False),
                    cache_salt=body.get("cache_salt"),
                )
            )
            aux = captured_layers(
                layer_outputs(ids, self.hidden_size, self.num_layers),
                self.capture_points,
                self.num_layers,
            )
            # SGLang keeps the post-norm state in every capture-only mode (LogitsProcessor
            # keep_last_hidden_states), DFLASH included.
            hidden = final_hidden_state(ids, self.hidden_size)
            skip = min(self.cached_prefix, len(ids) - 1)
            aux_rows.append(aux[skip:])
            hidden_rows.append(hidden[skip:])
            extend.append(len(ids) - skip)
        logits = LogitsProcessorOutput(
            next_token_logits=None,
            hidden_states=torch.cat(aux_rows).to(self.device),
            last_hidden_states=torch.cat(hidden_rows).to(self.device),
        )
        batch = ScheduleBatch(
            reqs=reqs, return_hidden_states=any(r.return_hidden_states for r in reqs)
        )
        result = GenerationBatchResult(
            logits_output=logits,
            next_token_ids=torch.tensor([7] * len(reqs)),
            extend_input_len_per_req=extend,
        )
        return batch, result

    def run(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Prefill one batch of ``GenerateReqInput``-shaped requests; answer like ``/generate``."""
        batch, result = self.build(requests)
        sent_before = len(self.socket) if self.socket is not None else 0
        self.processor.process_batch_result_prefill(batch, result)
        self.batches += 1
        if self.socket is None:
            return []
        out: list[dict[str, Any]] = []
        for payload in self.socket[sent_before:]:
            out.extend(tokenizer_side(payload))
        by_rid = {r["meta_info"]["id"]: r for r in out}
        return [by_rid[body["rid"]] for body in requests]
