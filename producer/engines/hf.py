"""The ``hf`` capture engine: transformers in process, on CPU or GPU.

The decoder runs without its ``lm_head`` (full logits are never needed): its ``last_hidden_state``
is the post-norm final hidden state (kept when the plan asks for it), and forward hooks on the
plan's layers collect their outputs (``hidden_states[i + 1]`` in transformers' numbering).
Sequences are grouped into forward passes by a token budget, right-padded inside a pass, and
returned unpadded, on CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from producer.engines.base import CapturedFeatures, CaptureEngine, EngineConfig, EngineError
from services.capture import CapturePlan, CapturePlanError, default_layer_ids, plan_for
from services.logs import event

log = logging.getLogger(__name__)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; anything else must name an available device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on GPU and float32 on CPU (bf16 matmuls are slow on most CPUs)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise EngineError(f"dtype {name!r} is not supported; use auto, "
                          + ", ".join(_DTYPES)) from None


def plan_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Group sequence indices so each group's rows x longest row fits ``token_budget``.

    Sequences are taken longest first so that rows of similar length share a pass (little
    padding); a sequence longer than the budget forms a group of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted descending, so the group's first row is its longest.
        if current and (len(current) + 1) * lengths[current[0]] > token_budget:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


class HFEngine(CaptureEngine):
    """Capture with a transformers causal LM loaded from a local directory."""

    name = "hf"

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        path = Path(config.model_path)
        if not (path / "config.json").is_file():
            raise EngineError(f"{path} has no config.json; point model_path at a local "
                              "Hugging Face model directory")
        if config.token_budget <= 0:
            raise EngineError(f"token_budget must be positive, got {config.token_budget}")
        self._device = resolve_device(config.device)
        self._dtype = resolve_dtype(config.dtype, self._device)
        self._token_budget = config.token_budget
        # Validate the capture layers from config.json before spending time on the weights.
        text_config = AutoConfig.from_pretrained(path).get_text_config()
        self._num_layers = int(text_config.num_hidden_layers)
        self._hidden_size = int(text_config.hidden_size)
        aux = (list(config.aux_layer_ids) if config.aux_layer_ids is not None
               else default_layer_ids(config.algorithm, self._num_layers))
        try:
            self._plan = plan_for(config.algorithm, aux, self._num_layers)
        except CapturePlanError as exc:
            raise EngineError(str(exc)) from None
        self._aux = aux
        model = AutoModelForCausalLM.from_pretrained(path, dtype=self._dtype)
        model.to(self._device).eval().requires_grad_(False)
        self._model = model
        self._decoder = model.get_decoder()
        layers = getattr(self._decoder, "layers", None)
        if layers is None or len(layers) != self._num_layers:
            raise EngineError(f"{type(model).__name__} has no decoder .layers list of "
                              f"{self._num_layers} layers; the hf engine supports decoder-only "
                              "models such as Llama and Qwen3")
        self._layers = layers
        self._vocab_size = int(model.get_input_embeddings().num_embeddings)
        self._pad_id = int(getattr(text_config, "pad_token_id", None) or 0)
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = getattr(text_config, "eos_token_id", None)
        self._stop_ids = [int(t) for t in ([] if eos is None else
                                            eos if isinstance(eos, list) else [eos])]
        log.info("capture engine ready", extra=event(
            "engine_ready", engine=self.name, model=str(path), device=str(self._device),
            dtype=str(self._dtype), aux_layer_ids=aux))

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

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

    @property
    def model(self) -> Any:
        """The loaded transformers model (read-only use: parity checks, lm_head for teachers)."""
        return self._model

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self._stop_ids)

    def _generate(self, ids: list[int], settings: Any, max_new_tokens: int,
                  seed: int) -> list[int]:
        """One sequence through the target's own ``generate``; the global RNG is forked, so
        the result depends on ``seed`` alone and nothing else's randomness moves."""
        sample = settings.mode == "sample"
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1,
            eos_token_id=self._stop_ids or None, pad_token_id=self._pad_id,
            temperature=settings.temperature if sample else None,
            top_p=settings.top_p if sample else None,
            top_k=settings.top_k if sample else None)
        inputs = torch.tensor([ids], dtype=torch.long, device=self._device)
        devices = [self._device] if self._device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            out = self._model.generate(inputs, attention_mask=torch.ones_like(inputs), **kwargs)
        return [int(t) for t in out[0, len(ids):].tolist()]

    def _capture(self, seqs: list[list[int]]) -> list[CapturedFeatures]:
        results: list[CapturedFeatures | None] = [None] * len(seqs)
        for group in plan_batches([len(s) for s in seqs], self._token_budget):
            for i, features in zip(group, self._forward([seqs[i] for i in group]), strict=True):
                results[i] = features
        done = [r for r in results if r is not None]
        if len(done) != len(seqs):
            raise EngineError("batch planning lost sequences; this is a bug in plan_batches")
        return done

    def _forward(self, seqs: list[list[int]]) -> list[CapturedFeatures]:
        longest = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, : len(s)] = 1
        captured: dict[int, torch.Tensor] = {}

        def keep(layer_id: int):
            def hook(_module: Any, _args: Any, output: Any) -> None:
                captured[layer_id] = output[0] if isinstance(output, tuple) else output
            return hook

        handles = [self._layers[i].register_forward_hook(keep(i)) for i in self._aux]
        try:
            with torch.inference_mode():
                out = self._decoder(input_ids=ids.to(self._device),
                                    attention_mask=mask.to(self._device), use_cache=False)
                aux = torch.cat([captured[i] for i in self._aux], dim=-1).cpu()
                final = out.last_hidden_state.cpu() if self._plan.final_hidden else None
        finally:
            for h in handles:
                h.remove()
        return [
            CapturedFeatures(
                aux_hidden_state=aux[row, : len(s)].clone(),
                hidden_state=None if final is None else final[row, : len(s)].clone())
            for row, s in enumerate(seqs)
        ]

    def _close(self) -> None:
        del self._model, self._decoder, self._layers
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
