"""The ``sglang`` capture engine: stock SGLang plus the draftflow plugin, features never come back.

The plugin (``producer.sglang_plugin``) writes each prompt's features from SGLang's scheduler
straight into the feature store and answers with a ref. What it writes follows the run's capture
plan: ``input_ids``, ``aux_hidden_state`` and ``hidden_state`` for EAGLE3; ``input_ids`` and
``hidden_states`` (the plan's K layers, no final state) for DFlash and Domino. So this engine
does not return tensors: ``capture_to_store(items)`` returns one ``CapturedRef`` (already
written, verified) or ``CaptureFailure`` per item, and the producer's work loop commits refs as
they are (adding its own ``loss_mask``) where the hf engine's tensors would go through
``FeatureStore.put_sample``. ``writes_to_store`` tells the loop which path an engine takes.

Two modes: an SGLang ``Engine`` in this process, or external SGLang servers over HTTP (several
requests in flight per server, bounded by a token budget; several servers per producer). Either
way the engine refuses a server whose flags are not those capture needs, probes the whole path
once at start, and verifies every ref; a refused ref's keys are removed and the prompt fails
non-retryably with the reason.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from producer.engines.base import CapturedFeatures, CaptureEngine, EngineConfig, EngineError
from producer.engines.hf import plan_batches
from producer.sglang_plugin import STORE_URL_ENV, gate, wire
from producer.sglang_plugin.checks import Expected, check_ref, expected_keys, server_problems
from services.api import common_pb2
from services.capture import (
    EAGLE3,
    CapturePlan,
    CapturePlanError,
    default_layer_ids,
    plan_for,
)
from services.logs import event
from services.store.base import FeatureStore
from services.tensors import make_key

log = logging.getLogger(__name__)
_DTYPES = {
    "auto": common_pb2.DTYPE_BFLOAT16,
    "bfloat16": common_pb2.DTYPE_BFLOAT16,
    "float16": common_pb2.DTYPE_FLOAT16,
    "float32": common_pb2.DTYPE_FLOAT32,
}
PROBE_RUN_ID = "draftflow-probe"


@dataclass(frozen=True)
class SGLangOptions:
    """How the sglang engine reaches SGLang and the feature store."""

    store: FeatureStore
    """The producer's handle on the store the plugin writes to (used to remove refused keys)."""
    server_urls: tuple[str, ...] = ()
    """External SGLang servers (``http://host:port``); empty selects the in-process engine."""
    store_url: str = ""
    """In-process mode: the store URL handed to SGLang's scheduler processes."""
    engine_kwargs: Mapping[str, Any] = field(default_factory=dict)
    """In-process mode: extra ``sglang.Engine`` arguments (``tp_size``, ``mem_fraction_static``)."""
    max_in_flight: int = 16
    """HTTP mode: most requests outstanding per server."""
    request_timeout_s: float = 600.0
    """HTTP mode: how long one capture request may take."""
    probe: bool = True
    """Capture a two-token prompt at start, so a broken path fails before any lease is taken."""


@dataclass(frozen=True)
class CaptureItem:
    """One prompt to capture and the sample it becomes."""

    run_id: str
    sample_id: str
    generation: int
    input_ids: tuple[int, ...]


@dataclass(frozen=True)
class CapturedRef:
    """A prompt whose features are in the store, verified against what was sent."""

    run_id: str
    sample_id: str
    generation: int
    store_id: str
    num_tokens: int
    aux_layer_ids: tuple[int, ...]
    """The plan's layer ids."""
    tensors: tuple[common_pb2.TensorSpec, ...]
    """The plan's tensors but ``loss_mask``, in plan order (EAGLE3: ``input_ids``,
    ``aux_hidden_state``, ``hidden_state``; DFlash: ``input_ids``, ``hidden_states``); checksums
    filled by the store."""


@dataclass(frozen=True)
class CaptureFailure:
    """A prompt that was not captured; none of its keys are left in the store."""

    sample_id: str
    reason: str
    retryable: bool


CaptureOutcome = CapturedRef | CaptureFailure


class _Server(Protocol):
    name: str

    def server_info(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class HttpServer:
    """An external SGLang server: ``/server_info`` and ``/generate`` with JSON."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.name = url.rstrip("/")
        self._timeout = timeout_s

    def server_info(self) -> dict[str, Any]:
        try:
            return self._call("GET", "/server_info", None, 30.0)
        except EngineError:
            return self._call("GET", "/get_server_info", None, 30.0)

    def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/generate", payload, self._timeout)

    def close(self) -> None:
        """Nothing to release: each request opens its own connection."""

    def _call(self, method: str, path: str, body: Any, timeout: float) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.name + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise EngineError(f"SGLang {self.name}{path} answered {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            raise EngineError(f"SGLang {self.name}{path} failed: {exc}") from exc


class LocalServer:
    """``sglang.Engine`` in this process; its scheduler processes load the plugin."""

    name = "in-process"

    def __init__(self, kwargs: Mapping[str, Any], store_url: str) -> None:
        if not store_url:
            raise EngineError(
                "in-process SGLang needs SGLangOptions.store_url: the scheduler "
                "processes open the feature store themselves"
            )
        # Inherited by the scheduler processes SGLang spawns.
        os.environ[STORE_URL_ENV] = store_url
        try:
            import sglang
        except ImportError as exc:
            raise EngineError(
                "SGLang is not installed: pip install 'draftflow[sglang]', or "
                "point the producer at SGLang servers over HTTP"
            ) from exc
        self._engine = sglang.Engine(**kwargs)

    def server_info(self) -> dict[str, Any]:
        return dict(self._engine.get_server_info())

    def generate_batch(self, payloads: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        out = self._engine.generate(
            input_ids=[p["input_ids"] for p in payloads],
            sampling_params=[p["sampling_params"] for p in payloads],
            return_hidden_states=True,
            rid=[p["rid"] for p in payloads],
            cache_salt=[p["cache_salt"] for p in payloads],
        )
        return list(out) if isinstance(out, list) else [out]

    def close(self) -> None:
        self._engine.shutdown()


def sglang_capture(plan: CapturePlan) -> str:
    """SGLang's capture convention for a plan (``aux_hidden_state_capture``): eagle3 or dflash.

    Both map layer id i to the output of decoder layer i (the model hooks capture the input of
    layer i + 1) and concatenate in ascending layer order, which the plan's ids follow.
    """
    return wire.CAPTURE_CONVENTIONS[plan.layers_tensor]


def capture_engine_kwargs(
    config: EngineConfig, aux: Sequence[int], extra: Mapping[str, Any]
) -> dict[str, Any]:
    """``sglang.Engine`` arguments for capture; ``extra`` may add but not weaken them.

    ``config.algorithm`` picks the convention: EAGLE3, or DFLASH for the DFlash family."""
    kwargs: dict[str, Any] = dict(extra)
    kwargs.update(
        model_path=config.model_path,
        skip_tokenizer_init=True,
        speculative_algorithm="EAGLE3" if config.algorithm == EAGLE3 else "DFLASH",
        enable_return_aux_hidden_states=True,
        return_aux_hidden_state_layer_ids=list(aux),
        chunked_prefill_size=-1,
        disable_radix_cache=True,
        disable_overlap_schedule=True,
    )
    if config.dtype != "auto":
        kwargs["dtype"] = config.dtype
    return kwargs


def capture_target(
    item: CaptureItem, store_id: str, plan: CapturePlan | None = None
) -> wire.CaptureTarget:
    """Where the plugin writes ``item`` and in which layout (EAGLE3's when ``plan`` is None)."""
    if plan is None:
        return wire.CaptureTarget(store_id, item.run_id, item.sample_id, item.generation)
    return wire.CaptureTarget(
        store_id,
        item.run_id,
        item.sample_id,
        item.generation,
        plan.layers_tensor,
        plan.final_hidden,
    )


def request_payload(
    item: CaptureItem, store_id: str, plan: CapturePlan | None = None
) -> dict[str, Any]:
    """The ``/generate`` body for one prompt: one greedy token, the target in custom_params."""
    rid = f"draftflow-{uuid.uuid4().hex}"
    target = capture_target(item, store_id, plan)
    return {
        "input_ids": list(item.input_ids),
        "sampling_params": {
            "max_new_tokens": 1,
            "temperature": 0.0,
            # A stop token as the one output would leave no output row to carry the ref.
            "ignore_eos": True,
            "custom_params": {wire.REQUEST_KEY: target.to_params()},
        },
        "return_hidden_states": True,
        "rid": rid,
        # A unique salt keeps radix-cache hits away even where the cache is on.
        "cache_salt": rid,
        "stream": False,
    }


def _ref_keys(ref: Mapping[str, Any], target: wire.CaptureTarget) -> list[str]:
    """Keys a refused ref names under ``target``'s prefix: the plugin wrote them."""
    prefix = make_key(target.store_id, target.run_id, target.sample_id, target.generation, "")
    keys: list[str] = []
    for entry in ref.get("tensors") or ():
        key = entry.get("key") if isinstance(entry, Mapping) else None
        if isinstance(key, str) and key.startswith(prefix):
            keys.append(key)
    return keys


class _Lane:
    """One HTTP server's in-flight window: request count and token budget."""

    def __init__(self, server: HttpServer, max_requests: int, max_tokens: int) -> None:
        self.server = server
        self._max_requests = max_requests
        self._max_tokens = max_tokens
        self._requests = 0
        self._tokens = 0
        self._cond = threading.Condition()

    def load(self) -> tuple[int, int]:
        with self._cond:
            return self._tokens, self._requests

    def acquire(self, tokens: int) -> None:
        with self._cond:
            # A prompt over the budget still runs, alone.
            self._cond.wait_for(
                lambda: (
                    self._requests < self._max_requests
                    and (self._requests == 0 or self._tokens + tokens <= self._max_tokens)
                )
            )
            self._requests += 1
            self._tokens += tokens

    def release(self, tokens: int) -> None:
        with self._cond:
            self._requests -= 1
            self._tokens -= tokens
            self._cond.notify_all()


class SGLangEngine(CaptureEngine):
    """Capture through SGLang servers whose plugin writes features into the store."""

    name = "sglang"
    writes_to_store = True

    def __init__(self, config: EngineConfig, options: SGLangOptions) -> None:
        super().__init__()
        from transformers import AutoConfig

        path = Path(config.model_path)
        if not (path / "config.json").is_file():
            raise EngineError(
                f"{path} has no config.json; the producer reads the target's "
                "shape from the same model directory SGLang serves"
            )
        if config.token_budget <= 0 or options.max_in_flight <= 0:
            raise EngineError("token_budget and max_in_flight must be positive")
        text_config = AutoConfig.from_pretrained(path).get_text_config()
        self._num_layers = int(text_config.num_hidden_layers)
        self._hidden_size = int(text_config.hidden_size)
        self._vocab_size = int(text_config.vocab_size)
        aux = (
            list(config.aux_layer_ids)
            if config.aux_layer_ids is not None
            else default_layer_ids(config.algorithm, self._num_layers)
        )
        try:
            self._plan = plan_for(config.algorithm, aux, self._num_layers)
        except CapturePlanError as exc:
            raise EngineError(str(exc)) from None
        if config.dtype not in _DTYPES:
            raise EngineError(f"dtype {config.dtype!r} is not supported; use " + ", ".join(_DTYPES))
        self._aux = aux
        self._options = options
        self._token_budget = config.token_budget
        self._expected = Expected(
            options.store.store_id,
            tuple(aux),
            self._hidden_size,
            _DTYPES[config.dtype],
            self._plan.layers_tensor,
            self._plan.final_hidden,
        )
        self._servers: list[Any] = []
        try:
            if options.server_urls:
                http = [HttpServer(u, options.request_timeout_s) for u in options.server_urls]
                self._servers = list(http)
                self._lanes = [_Lane(s, options.max_in_flight, config.token_budget) for s in http]
                self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
                    max_workers=options.max_in_flight * len(http),
                    thread_name_prefix="sglang-capture",
                )
            else:
                kwargs = capture_engine_kwargs(config, aux, options.engine_kwargs)
                self._servers = [LocalServer(kwargs, options.store_url)]
                self._lanes = []
                self._pool = None
            for server in self._servers:
                self._check_server(server)
            if options.probe:
                self._probe()
        except BaseException:
            self._close()
            raise
        log.info(
            "capture engine ready",
            extra=event(
                "engine_ready",
                engine=self.name,
                servers=[s.name for s in self._servers],
                aux_layer_ids=aux,
                layers_tensor=self._plan.layers_tensor,
                final_hidden=self._plan.final_hidden,
                store=options.store.store_id,
            ),
        )

    # -- CaptureEngine ---------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Features stay on the SGLang side; nothing is computed in this process."""
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return {
            common_pb2.DTYPE_BFLOAT16: torch.bfloat16,
            common_pb2.DTYPE_FLOAT16: torch.float16,
            common_pb2.DTYPE_FLOAT32: torch.float32,
        }[self._expected.dtype]

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def aux_layer_ids(self) -> list[int]:
        return list(self._aux)

    @property
    def plan(self) -> CapturePlan:
        return self._plan

    def _capture(self, seqs: list[list[int]]) -> list[CapturedFeatures]:
        raise EngineError(
            "the sglang engine writes features into the store and returns refs; "
            "call capture_to_store(items) (writes_to_store is True)"
        )

    def _close(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=True)
        for server in self._servers:
            try:
                server.close()
            except Exception:
                log.exception("closing SGLang %s failed", server.name)

    # -- capture ---------------------------------------------------------------------------------

    def capture_to_store(self, items: Sequence[CaptureItem]) -> list[CaptureOutcome]:
        """Capture every item; outcome ``i`` belongs to ``items[i]``. Never raises per prompt."""
        if self._closed:
            raise EngineError("sglang engine is closed; create a new one")
        outcomes: list[CaptureOutcome | None] = [None] * len(items)
        todo: list[int] = []
        for i, item in enumerate(items):
            reason = self._input_problem(item)
            if reason:
                outcomes[i] = CaptureFailure(item.sample_id, reason, retryable=False)
            else:
                todo.append(i)
        responses = self._send([items[i] for i in todo])
        for i, response in zip(todo, responses, strict=True):
            outcomes[i] = self._judge(items[i], response)
        return [o for o in outcomes if o is not None]

    def _input_problem(self, item: CaptureItem) -> str:
        if not item.input_ids:
            return "empty prompt; every prompt needs at least one token"
        bad = [t for t in item.input_ids if t < 0 or t >= self._vocab_size]
        if bad:
            return f"token ids {bad[:5]} outside the target vocabulary [0, {self._vocab_size})"
        return ""

    def _send(self, items: Sequence[CaptureItem]) -> list[dict[str, Any] | Exception]:
        store_id = self._expected.store_id
        payloads = [request_payload(item, store_id, self._plan) for item in items]
        if self._pool is None:
            return self._send_local(payloads)
        futures: list[Future[dict[str, Any]]] = []
        for payload in payloads:
            tokens = len(payload["input_ids"])
            lane = min(self._lanes, key=lambda lane: lane.load())
            lane.acquire(tokens)
            futures.append(self._pool.submit(self._post, lane, payload, tokens))
        results: list[dict[str, Any] | Exception] = []
        for future in futures:
            try:
                results.append(future.result())
            except Exception as exc:
                results.append(exc)
        return results

    @staticmethod
    def _post(lane: _Lane, payload: dict[str, Any], tokens: int) -> dict[str, Any]:
        try:
            return lane.server.generate(payload)
        finally:
            lane.release(tokens)

    def _send_local(self, payloads: list[dict[str, Any]]) -> list[dict[str, Any] | Exception]:
        server: LocalServer = self._servers[0]
        results: list[dict[str, Any] | Exception] = [EngineError("not sent") for _ in payloads]
        groups = plan_batches([len(p["input_ids"]) for p in payloads], self._token_budget)
        for group in groups:
            try:
                answers = server.generate_batch([payloads[i] for i in group])
                if len(answers) != len(group):
                    raise EngineError(f"SGLang answered {len(answers)} of {len(group)} prompts")
                for i, answer in zip(group, answers, strict=True):
                    results[i] = answer
            except Exception as exc:
                for i in group:
                    results[i] = exc
        return results

    def _judge(self, item: CaptureItem, response: dict[str, Any] | Exception) -> CaptureOutcome:
        target = capture_target(item, self._expected.store_id, self._plan)
        if isinstance(response, Exception):
            return self._fail(target, f"SGLang request failed: {response}", retryable=True)
        try:
            ref = wire.ref_from_meta_info(response.get("meta_info") or {})
        except wire.WireError as exc:
            return self._fail(target, str(exc), retryable=False)
        verdict = check_ref(ref, target, item.input_ids, self._expected)
        if not verdict.ok:
            return self._fail(
                target, verdict.reason, retryable=verdict.retryable, written=_ref_keys(ref, target)
            )
        return CapturedRef(
            item.run_id,
            item.sample_id,
            item.generation,
            target.store_id,
            len(item.input_ids),
            tuple(self._aux),
            verdict.specs,
        )

    def _fail(
        self,
        target: wire.CaptureTarget,
        reason: str,
        *,
        retryable: bool,
        written: Sequence[str] = (),
    ) -> CaptureFailure:
        # The plugin may have written before the answer went wrong: free whatever it could have,
        # including keys a ref names outside the plan's layout (a server on another layout).
        keys = expected_keys(target)
        keys += [k for k in written if k not in keys]
        try:
            self._options.store.remove(keys)
        except Exception:
            log.exception(
                "removing keys of a refused capture failed",
                extra=event(
                    "capture_cleanup_failed", run_id=target.run_id, sample_id=target.sample_id
                ),
            )
        log.warning(
            "capture refused: %s",
            reason,
            extra=event(
                "capture_refused",
                run_id=target.run_id,
                sample_id=target.sample_id,
                retryable=retryable,
            ),
        )
        return CaptureFailure(target.sample_id, reason, retryable)

    # -- start-up checks -------------------------------------------------------------------------

    def _check_server(self, server: _Server) -> None:
        info = server.server_info()
        version = str(info.get("version", ""))
        try:
            gate.check_version(version)
        except gate.IncompatibleSGLang as exc:
            raise EngineError(f"SGLang {server.name}: {exc}") from None
        problems = server_problems(info, self._aux, sglang_capture(self._plan))
        if problems:
            raise EngineError(
                f"SGLang {server.name} is not launched for capture:\n  - " + "\n  - ".join(problems)
            )

    def _probe(self) -> None:
        """Capture two tokens on every server and free them: proves plugin, flags and store."""
        for server in self._servers:
            item = CaptureItem(PROBE_RUN_ID, uuid.uuid4().hex, 0, (0, 1))
            payload = request_payload(item, self._expected.store_id, self._plan)
            response: dict[str, Any] | Exception
            if isinstance(server, HttpServer):
                try:
                    response = server.generate(payload)
                except EngineError as exc:
                    response = exc
            else:
                response = self._send_local([payload])[0]
            outcome = self._judge(item, response)
            if isinstance(outcome, CaptureFailure):
                raise EngineError(
                    f"the start-up capture probe on SGLang {server.name} failed: {outcome.reason}"
                )
            self._options.store.remove([s.key for s in outcome.tensors])
