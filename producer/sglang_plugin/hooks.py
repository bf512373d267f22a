"""The three wrappers that turn SGLang's prefill hidden-state path into feature-store writes.

Per scheduler batch (``SchedulerBatchResultProcessor.process_batch_result_prefill``):

1. ``_append_prefill_hidden_states`` runs once per request. For a capture request (one whose
   ``custom_params`` name a ``CaptureTarget``) the wrapper keeps views of the request's prompt
   rows of the captured layers' concat (``logits_output.hidden_states``) and, when the target's
   plan asks for it (EAGLE3), of the post-norm final hidden state
   (``logits_output.last_hidden_states``) instead of turning them into float lists. A DFlash
   target keeps the layer rows only: SGLang still holds the final state on the GPU, but it is
   never copied or written.
2. ``SchedulerOutputStreamer.stream_output`` sends the batch's responses. Before it runs, the
   wrapper copies every kept row into the reused host buffer, writes the batch with one
   ``BatchWriter.write`` and sets each request's ref (or error) in ``req.customized_info``, so a
   response never leaves before its put completed.
3. ``process_batch_result_prefill`` brackets the batch, so rows kept for a batch that never
   reached step 2 are dropped instead of leaking into the next batch.

Only the scheduler that sends responses (tensor-parallel rank 0, which holds the
``send_to_detokenizer`` socket) writes; the other ranks skip capture requests' rows.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from producer.sglang_plugin import wire
from producer.sglang_plugin.staging import HostStaging, align
from producer.sglang_plugin.writer import (
    BatchWriteFailed,
    BatchWriter,
    RegisteredMemory,
    SampleWrite,
)
from services.logs import event
from services.store.base import FeatureStore

log = logging.getLogger(__name__)

DEFAULT_STAGING_BYTES = 256 << 20


@dataclass
class _Kept:
    """One capture request's rows, kept until the batch's responses are streamed."""

    req: Any
    target: wire.CaptureTarget
    aux_rows: torch.Tensor
    """The captured layers' concat, written as ``target.layers_tensor``."""
    hidden_rows: torch.Tensor | None
    """The post-norm final state; None when the target's plan does not capture it."""
    aux_layer_ids: tuple[int, ...]


def capture_target(req: Any) -> wire.CaptureTarget | None:
    """The request's target, or None for an ordinary request; raise ``WireError`` if malformed."""
    params = getattr(req.sampling_params, "custom_params", None)
    if not isinstance(params, dict) or wire.REQUEST_KEY not in params:
        return None
    value = params[wire.REQUEST_KEY]
    if not isinstance(value, dict):
        raise wire.WireError(f"custom_params.{wire.REQUEST_KEY} must be an object")
    return wire.CaptureTarget.from_params(value)


def _ids_tensor(ids: Any) -> torch.Tensor:
    """SGLang keeps prompt ids in an ``array('q')``: read it without a Python-level loop."""
    if isinstance(ids, array) and ids.typecode == "q":
        return (
            torch.frombuffer(ids, dtype=torch.int64)
            if len(ids)
            else torch.empty(0, dtype=torch.int64)
        )
    return torch.as_tensor(list(ids), dtype=torch.int64)


def set_ref(req: Any, ref: dict[str, Any]) -> None:
    """Attach the plugin's response entry; SGLang forwards it as ``meta_info[RESPONSE_KEY]``."""
    if req.customized_info is None:
        req.customized_info = {}
    req.customized_info[wire.RESPONSE_KEY] = [ref]


# Registered memory the store keeps for itself (its empty-tensor marker, alignment).
_REGISTERED_RESERVE = 1 << 20


def registered_limit(store: Any) -> int | None:
    """Bytes of registered memory the store holds, where its config says (Mooncake's
    ``buffer_mb``); None when unknown."""
    buffer_mb = getattr(getattr(store, "config", None), "buffer_mb", None)
    return buffer_mb << 20 if isinstance(buffer_mb, int) else None


def registered_allocator(store: RegisteredMemory) -> Callable[[int], torch.Tensor]:
    """Staging memory from the store's registered buffer, refusing sizes it cannot hold:
    waiting for registered memory that can never free up would stall the scheduler."""
    limit = registered_limit(store)

    def allocate(nbytes: int) -> torch.Tensor:
        if limit is not None and align(nbytes) > limit - _REGISTERED_RESERVE:
            raise MemoryError(
                f"a capture batch needs {nbytes} bytes of registered memory, the store "
                f"registered {limit}: raise buffer_mb in DRAFTFLOW_STORE_URL or lower "
                "SGLang's --max-prefill-tokens"
            )
        return store.empty((nbytes,), torch.uint8)

    return allocate


class CaptureHooks:
    """Per-process capture state and the wrappers installed on SGLang's scheduler classes."""

    def __init__(
        self, open_store: Callable[[], FeatureStore], staging_bytes: int = DEFAULT_STAGING_BYTES
    ) -> None:
        self._open_store = open_store
        self._staging_bytes = staging_bytes
        self._writer: BatchWriter | None = None
        self._staging: HostStaging | None = None
        self._kept: list[_Kept] = []

    # -- wrappers (signatures follow the wrapped methods, see gate.HOOKED_METHODS) -------------

    def around_process_prefill(
        self, original: Callable[..., Any], processor: Any, batch: Any, result: Any
    ) -> Any:
        self._drop_kept("rows left over from an earlier batch")
        try:
            return original(processor, batch, result)
        finally:
            self._drop_kept("the batch ended before its responses were streamed")

    def around_append(
        self,
        original: Callable[..., int],
        processor: Any,
        *,
        req: Any,
        logits_output: Any,
        hidden_state_offset: int,
        capture_hidden_mode: Any,
        extend_input_len: int,
        store: bool = True,
    ) -> int:
        try:
            target = capture_target(req)
        except wire.WireError as exc:
            target = None
            if store and self._sends_responses(processor):
                set_ref(req, wire.error_ref(str(exc), retryable=False))
            # Fall through to the offset bookkeeping without storing rows.
            store = False
        if target is None and store:
            return original(
                processor,
                req=req,
                logits_output=logits_output,
                hidden_state_offset=hidden_state_offset,
                capture_hidden_mode=capture_hidden_mode,
                extend_input_len=extend_input_len,
                store=store,
            )
        # With store=False SGLang only advances the row offset: the rows of a capture request
        # are never turned into float lists.
        end = original(
            processor,
            req=req,
            logits_output=logits_output,
            hidden_state_offset=hidden_state_offset,
            capture_hidden_mode=capture_hidden_mode,
            extend_input_len=extend_input_len,
            store=False,
        )
        if target is None or not store or not self._sends_responses(processor):
            return end
        server_args = processor.output_streamer.server_args
        layer_ids = tuple(server_args.return_aux_hidden_state_layer_ids or ())
        error = self._check_convention(target, server_args) or self._check_rows(
            req, logits_output, capture_hidden_mode, extend_input_len, target, layer_ids
        )
        if error is not None:
            set_ref(req, wire.error_ref(error, retryable=False))
            return end
        self._kept.append(
            _Kept(
                req=req,
                target=target,
                aux_rows=logits_output.hidden_states[hidden_state_offset:end],
                hidden_rows=(
                    logits_output.last_hidden_states[hidden_state_offset:end]
                    if target.final_hidden
                    else None
                ),
                aux_layer_ids=layer_ids,
            )
        )
        return end

    def before_stream(
        self,
        original: Callable[..., Any],
        streamer: Any,
        reqs: Any,
        return_logprob: Any,
        skip_req: Any = None,
    ) -> Any:
        if self._kept:
            kept, self._kept = self._kept, []
            self._flush(kept)
        return original(streamer, reqs, return_logprob, skip_req)

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _sends_responses(processor: Any) -> bool:
        return processor.output_streamer.send_to_detokenizer.socket is not None

    @staticmethod
    def _check_convention(target: wire.CaptureTarget, server_args: Any) -> str | None:
        """The server must capture the target's layers with the convention its layout names."""
        wanted = wire.CAPTURE_CONVENTIONS[target.layers_tensor]
        found = getattr(server_args, "aux_hidden_state_capture", None)
        if str(found or "").lower() == wanted:
            return None
        return (
            f"the request captures {target.layers_tensor} ({wanted.upper()} convention) but the "
            f"server captures with {found!r}: launch SGLang with --speculative-algorithm "
            f"{wanted.upper()} --enable-return-aux-hidden-states"
        )

    @staticmethod
    def _check_rows(
        req: Any,
        logits_output: Any,
        capture_hidden_mode: Any,
        extend_input_len: int,
        target: wire.CaptureTarget,
        layer_ids: Sequence[int],
    ) -> str | None:
        if not capture_hidden_mode.is_full():
            return (
                f"the server captured hidden states in mode {capture_hidden_mode!r}, not full: "
                "launch SGLang with --enable-return-aux-hidden-states"
            )
        if target.final_hidden and logits_output.last_hidden_states is None:
            return (
                "the server kept no post-norm hidden states: launch SGLang with "
                "--enable-return-aux-hidden-states (capture-only aux mode)"
            )
        prompt_len = len(req.origin_input_ids)
        if extend_input_len != prompt_len:
            return (
                f"the forward covered {extend_input_len} of the prompt's {prompt_len} tokens "
                "(a prefix-cache hit or a prefill chunk): launch SGLang with "
                "--chunked-prefill-size -1 and --disable-radix-cache, or salt each request"
            )
        aux_width = logits_output.hidden_states.shape[-1]
        if not target.final_hidden:
            # No final state to read H from: the concat splits evenly into one block per layer
            # (the producer checks the exact width K·H against the target's config).
            if not layer_ids or aux_width % len(layer_ids):
                return (
                    f"captured layer width {aux_width} does not split into the server's "
                    f"{len(layer_ids)} layers {list(layer_ids)}: launch SGLang with "
                    "--return-aux-hidden-state-layer-ids naming the run's layers"
                )
            return None
        hidden_width = logits_output.last_hidden_states.shape[-1]
        if aux_width % hidden_width:
            return (
                f"aux hidden-state width {aux_width} is not a multiple of the hidden size "
                f"{hidden_width}: the model returned something other than an aux concat"
            )
        return None

    def _ensure_writer(self) -> tuple[BatchWriter, HostStaging]:
        if self._writer is None or self._staging is None:
            store = self._open_store()
            if isinstance(store, RegisteredMemory):
                allocate = registered_allocator(store)
                limit = registered_limit(store)
                initial = (
                    self._staging_bytes if limit is None else min(self._staging_bytes, limit // 2)
                )
                self._staging = HostStaging(initial, allocate)
            else:
                self._staging = HostStaging(self._staging_bytes)
            self._writer = BatchWriter(store)
        return self._writer, self._staging

    def _flush(self, kept: Sequence[_Kept]) -> None:
        try:
            writer, staging = self._ensure_writer()
        except Exception as exc:
            log.exception("cannot open the feature store", extra=event("capture_store_open"))
            for item in kept:
                set_ref(
                    item.req,
                    wire.error_ref(f"cannot open the feature store: {exc}", retryable=True),
                )
            return
        store_id = writer.store.store_id
        ready: list[_Kept] = []
        for item in kept:
            if item.target.store_id != store_id:
                set_ref(
                    item.req,
                    wire.error_ref(
                        f"this SGLang server writes to store {store_id!r} but the request names "
                        f"{item.target.store_id!r}: point DRAFTFLOW_STORE_URL of the server at "
                        "the producer's store",
                        retryable=False,
                    ),
                )
            else:
                ready.append(item)
        if not ready:
            return
        try:
            samples = self._stage(staging, ready)
            specs = writer.write(samples)
        except BatchWriteFailed as exc:
            self._fail_batch(ready, str(exc), exc.retryable)
            return
        except Exception as exc:
            # Staging failed before any put: nothing of the batch is in the store.
            self._fail_batch(ready, f"staging the batch failed: {exc!r}", True)
            return
        finally:
            staging.reset()
        for item, sample_specs in zip(ready, specs, strict=True):
            set_ref(
                item.req,
                wire.ok_ref(
                    item.target,
                    num_tokens=item.aux_rows.shape[0],
                    prompt_tokens=len(item.req.origin_input_ids),
                    aux_layer_ids=item.aux_layer_ids,
                    specs=sample_specs,
                ),
            )

    @staticmethod
    def _fail_batch(items: Sequence[_Kept], error: str, retryable: bool) -> None:
        log.error(error, extra=event("capture_batch_failed", samples=len(items)))
        for item in items:
            set_ref(item.req, wire.error_ref(error, retryable=retryable))

    @staticmethod
    def _stage(staging: HostStaging, kept: Sequence[_Kept]) -> list[SampleWrite]:
        """Copy every kept row into the host buffer; return the batch as views of it."""
        total = 0
        for item in kept:
            n = item.aux_rows.shape[0]
            total += align(n * 8)
            for rows in (item.aux_rows, item.hidden_rows):
                if rows is not None:
                    total += align(rows.numel() * rows.element_size())
        staging.ensure(total)
        samples: list[SampleWrite] = []
        on_device = False
        for item in kept:
            n = item.aux_rows.shape[0]
            ids = staging.take((n,), torch.int64)
            ids.copy_(_ids_tensor(item.req.origin_input_ids))
            # Buffer and response order: input_ids, the layers' concat, then the final state.
            tensors = {wire.INPUT_IDS: ids}
            named = [(item.target.layers_tensor, item.aux_rows)]
            if item.hidden_rows is not None:
                named.append((wire.HIDDEN_STATE, item.hidden_rows))
            for name, rows in named:
                host = staging.take(tuple(rows.shape), rows.dtype)
                host.copy_(rows, non_blocking=True)
                tensors[name] = host
                on_device = on_device or rows.is_cuda
            samples.append(
                SampleWrite(
                    run_id=item.target.run_id,
                    sample_id=item.target.sample_id,
                    generation=item.target.generation,
                    tensors=tensors,
                )
            )
        if on_device:
            # The copies were queued on the current stream; the store reads the host bytes.
            torch.cuda.current_stream().synchronize()
        return samples

    def _drop_kept(self, why: str) -> None:
        if not self._kept:
            return
        log.error(
            "dropping %d captured requests' rows: %s",
            len(self._kept),
            why,
            extra=event("capture_rows_dropped", requests=len(self._kept)),
        )
        for item in self._kept:
            set_ref(item.req, wire.error_ref(f"capture dropped: {why}", retryable=True))
        self._kept = []
