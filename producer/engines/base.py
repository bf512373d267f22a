"""The capture-engine contract: token sequences in, hidden states out, one result per input.

What is captured follows the run's ``CapturePlan`` (``services.capture``): the outputs of the
plan's layers concatenated in order, plus the final hidden state when the plan asks for it
(EAGLE3 does; the DFlash family does not).

Public methods hold the guards (input validation, result shape checks, closed state); engines fill
the ``_``-prefixed hooks. The hf engine runs transformers in process; the sglang engine plugs into
the same contract.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.api import run_pb2
from services.capture import CapturePlan


class EngineError(RuntimeError):
    """The engine cannot be built or cannot capture; the message says what to change."""


@dataclass(frozen=True)
class EngineConfig:
    """What every capture engine needs to load a target; engines ignore fields they cannot use."""

    model_path: str
    """Local directory of the target model (Hugging Face layout)."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    dtype: str = "auto"
    """``auto`` (bfloat16 on GPU, float32 on CPU), ``bfloat16``, ``float16`` or ``float32``."""
    aux_layer_ids: tuple[int, ...] | None = None
    """Layers to capture (ascending, in [0, N-2]); default: EAGLE3's [1, N//2-1, N-4]."""
    algorithm: str = "eagle3"
    """The run's draft algorithm; it decides the capture plan (see ``services.capture``)."""
    token_budget: int = 8192
    """Most padded tokens (rows x longest row) in one forward pass; longer sequences run alone."""


@dataclass(frozen=True)
class CapturedFeatures:
    """Hidden states of one sequence, unpadded."""

    aux_hidden_state: torch.Tensor
    """[L, K·H]: outputs of the plan's K layers, concatenated in the plan's order."""
    hidden_state: torch.Tensor | None = None
    """[L, H]: the final hidden state after the model's last norm (what lm_head reads), when
    the plan captures it."""

    @property
    def num_tokens(self) -> int:
        return int(self.aux_hidden_state.shape[0])


class CaptureEngine(ABC):
    """Runs the frozen target model over token sequences and returns their hidden states."""

    name: str = "base"

    def __init__(self) -> None:
        self._closed = False

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the model runs."""

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype of the captured hidden states (the model's compute dtype)."""

    @property
    @abstractmethod
    def num_layers(self) -> int:
        """Decoder layers of the target."""

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Hidden size H of the target."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Rows of the target's embedding: every token id must be below this."""

    @property
    @abstractmethod
    def aux_layer_ids(self) -> list[int]:
        """The layers whose outputs form ``aux_hidden_state``, in order."""

    @property
    @abstractmethod
    def plan(self) -> CapturePlan:
        """What this engine captures for the run."""

    def capture(self, batch: Sequence[Sequence[int]]) -> list[CapturedFeatures]:
        """Capture every sequence of ``batch``; result ``i`` belongs to ``batch[i]``."""
        if self._closed:
            raise EngineError(f"{self.name} engine is closed; create a new one")
        seqs: list[list[int]] = []
        for i, seq in enumerate(batch):
            ids = [int(t) for t in seq]
            if not ids:
                raise EngineError(f"batch[{i}] is empty; every sequence needs at least one token")
            bad = [t for t in ids if t < 0 or t >= self.vocab_size]
            if bad:
                raise EngineError(
                    f"batch[{i}] has token ids {bad[:5]} outside the target vocabulary "
                    f"[0, {self.vocab_size}); was it tokenized with another tokenizer?"
                )
            seqs.append(ids)
        if not seqs:
            return []
        results = self._capture(seqs)
        if len(results) != len(seqs):
            raise EngineError(f"{self.name} engine returned {len(results)} results "
                              f"for {len(seqs)} sequences")
        h, plan = self.hidden_size, self.plan
        width = len(plan.layer_ids) * h
        for i, (ids, res) in enumerate(zip(seqs, results, strict=True)):
            n = len(ids)
            final = None if res.hidden_state is None else tuple(res.hidden_state.shape)
            want_final = (n, h) if plan.final_hidden else None
            if tuple(res.aux_hidden_state.shape) != (n, width) or final != want_final:
                raise EngineError(
                    f"{self.name} engine returned shapes aux {tuple(res.aux_hidden_state.shape)}, "
                    f"hidden {final} for batch[{i}] of {n} tokens; "
                    f"expected ({n}, {width}) and {want_final}"
                )
        return results

    @property
    def can_generate(self) -> bool:
        """Whether this engine can regenerate responses (``generate``)."""
        return type(self)._generate is not CaptureEngine._generate

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end a generated turn (the target's end-of-sequence ids)."""
        return []

    def generate(self, input_ids: Sequence[int], *, settings: run_pb2.RegenerateConfig,
                 max_new_tokens: int, seed: int) -> list[int]:
        """The target's continuation of ``input_ids``: at most ``max_new_tokens`` new ids, the
        stop token included when it stopped on one. Sampling is seeded by ``seed`` alone."""
        if self._closed:
            raise EngineError(f"{self.name} engine is closed; create a new one")
        ids = [int(t) for t in input_ids]
        if not ids:
            raise EngineError("generate needs at least one input token")
        if max_new_tokens <= 0:
            raise EngineError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if settings.mode not in ("greedy", "sample"):
            raise EngineError(f"regenerate.mode {settings.mode!r} is unknown; use greedy or sample")
        new = self._generate(ids, settings, max_new_tokens, seed)
        if len(new) > max_new_tokens:
            raise EngineError(f"{self.name} engine generated {len(new)} tokens, more than "
                              f"max_new_tokens={max_new_tokens}")
        return new

    def _generate(self, ids: list[int], settings: run_pb2.RegenerateConfig,
                  max_new_tokens: int, seed: int) -> list[int]:
        raise EngineError(f"the {self.name} engine cannot regenerate responses; "
                          "run the producer with --engine hf")

    def close(self) -> None:
        """Release the model; further captures are refused. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> CaptureEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def _capture(self, seqs: list[list[int]]) -> list[CapturedFeatures]:
        """Capture validated, non-empty sequences."""

    def _close(self) -> None:  # noqa: B027 - engines without resources need nothing here
        """Free the engine's resources."""
