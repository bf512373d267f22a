"""A stand-in ``sglang`` module for the in-process mode: ``Engine`` with 0.5.23's signatures.

``Engine(**kwargs)`` resolves its server arguments the way SGLang does for the flags capture
uses, "loads plugins" (installs the capture hooks on the fake scheduler classes, as SGLang's
scheduler process does through the entry point) and serves ``generate`` through a
``FakeScheduler``.
"""

from __future__ import annotations

from typing import Any

import producer.sglang_plugin as plugin
from producer.sglang_plugin.hooks import CaptureHooks
from services.store.base import FeatureStore
from tests.sglang import fakes

__version__ = "0.5.23"
# Set by the test: how the scheduler process opens the store (normally DRAFTFLOW_STORE_URL).
open_store: Any = None
HIDDEN = 16

STOCK_ARGS: dict[str, Any] = {
    "enable_return_aux_hidden_states": False,
    "aux_hidden_state_capture": None,
    "speculative_algorithm": None,
    "return_aux_hidden_state_layer_ids": None,
    "chunked_prefill_size": 8192,
    "disable_radix_cache": False,
    "skip_tokenizer_init": False,
    "return_hidden_states_mode": None,
    "enable_return_hidden_states": False,
    "disable_overlap_schedule": False,
    "pp_size": 1,
    "tp_size": 1,
    "disaggregation_mode": "null",
    "dtype": "auto",
}


def resolve(kwargs: dict[str, Any]) -> dict[str, Any]:
    """SGLang's resolution of the capture flags (``handle_aux_hidden_state_capture``): the
    algorithm only names the convention; DFLASH needs explicit layer ids."""
    args = {**STOCK_ARGS, **kwargs}
    if args["enable_return_aux_hidden_states"]:
        method = str(args["speculative_algorithm"] or "").upper()
        if method not in ("EAGLE3", "DFLASH", "DSPARK"):
            raise ValueError(f"--enable-return-aux-hidden-states cannot capture with {method!r}")
        if method != "EAGLE3" and not args["return_aux_hidden_state_layer_ids"]:
            raise ValueError(f"--enable-return-aux-hidden-states with {method} requires "
                             "--return-aux-hidden-state-layer-ids.")
        args["aux_hidden_state_capture"] = method.lower()
        args["speculative_algorithm"] = None
        args["return_hidden_states_mode"] = args["return_hidden_states_mode"] or "full"
    return args


class Engine:
    """``sglang.Engine``: the methods the producer calls, with the real parameter lists."""

    instances: list[Engine] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.args = resolve(kwargs)
        layers = self.args["return_aux_hidden_state_layer_ids"] or [1, 2, 3]
        store: FeatureStore = open_store()
        self.hooks = plugin.install(
            fakes.SchedulerBatchResultProcessor,
            fakes.SchedulerOutputStreamer,
            version=__version__,
            hooks=CaptureHooks(lambda: store, 1 << 16),
        )
        self.scheduler = fakes.FakeScheduler(HIDDEN, layers, server_args=self.args)
        self.calls: list[int] = []
        self.closed = False
        Engine.instances.append(self)

    def generate(
        self,
        prompt=None,
        sampling_params=None,
        input_ids=None,
        image_data=None,
        audio_data=None,
        video_data=None,
        mm_hashes=None,
        mm_content_hashes=None,
        return_logprob=False,
        logprob_start_len=None,
        top_logprobs_num=None,
        token_ids_logprob=None,
        lora_path=None,
        custom_logit_processor=None,
        require_reasoning=False,
        return_hidden_states=False,
        return_routed_experts=False,
        routed_experts_start_len=0,
        stream=False,
        bootstrap_host=None,
        bootstrap_port=None,
        bootstrap_room=None,
        routed_dp_rank=None,
        disagg_prefill_dp_rank=None,
        kv_hints=None,
        data_parallel_rank=None,
        external_trace_header=None,
        rid=None,
        session_params=None,
        priority=None,
        session_id=None,
        *,
        cache_salt=None,
    ):  # type: ignore[no-untyped-def]
        single = input_ids and isinstance(input_ids[0], int)
        ids_list = [input_ids] if single else input_ids
        n = len(ids_list)

        def per_item(value: Any) -> list[Any]:
            return value if isinstance(value, list) else [value] * n

        bodies = [
            {
                "input_ids": ids,
                "sampling_params": sp,
                "return_hidden_states": rh,
                "rid": r,
                "cache_salt": salt,
            }
            for ids, sp, rh, r, salt in zip(
                ids_list,
                per_item(sampling_params),
                per_item(return_hidden_states),
                per_item(rid),
                per_item(cache_salt),
                strict=True,
            )
        ]
        self.calls.append(n)
        out = self.scheduler.run(bodies)
        return out[0] if single else out

    def get_server_info(self):  # type: ignore[no-untyped-def]
        return {**self.args, "version": __version__, "internal_states": []}

    def shutdown(self):  # type: ignore[no-untyped-def]
        self.closed = True
        plugin.uninstall(fakes.SchedulerBatchResultProcessor, fakes.SchedulerOutputStreamer)
