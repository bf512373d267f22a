"""The run's draft vocabulary and the target facts that ``draftflow run create`` sends.

The draft predicts over a smaller vocabulary: the ``draft_vocab_size`` target tokens that occur
most often in the trained (loss-masked) positions of the dataset. Ties are broken by the smaller
target id; when the dataset has fewer distinct tokens, the smallest unused ids fill the rest, so
the map always has exactly ``draft_vocab_size`` entries. The map follows SGLang's convention:
``draft_token_ids`` ascending and ``d2t[i] = draft_token_ids[i] - i``. It is a pure function of
the model's tokenizer, the capture settings and the dataset: building it twice gives the same map.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from producer.dataprep import PreparedPrompt, prepare_dataset
from services.api import run_pb2
from services.capture import CapturePlanError, default_layer_ids, plan_for
from services.config import ConfigError, RunConfigFile, to_proto
from services.fingerprint import vocab_map_hash
from services.tokenizer import tokenizer_hash


def token_frequencies(prompts: Iterable[PreparedPrompt], vocab_size: int) -> torch.Tensor:
    """How often each target id occurs at a trained position: int64 [vocab_size]."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for prompt in prompts:
        ids = prompt.input_ids[prompt.loss_mask.bool()]
        if ids.numel() and int(ids.max()) >= vocab_size:
            raise ConfigError(f"token id {int(ids.max())} is outside the target vocabulary of "
                              f"{vocab_size}; the tokenizer does not belong to this model")
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def build_vocab_map(counts: torch.Tensor, draft_vocab_size: int) -> run_pb2.VocabMap:
    """The ``draft_vocab_size`` most frequent ids (ties: smaller id first), as a ``VocabMap``."""
    vocab_size = int(counts.shape[0])
    if not 0 < draft_vocab_size <= vocab_size:
        raise ConfigError(
            f"draft.draft_vocab_size={draft_vocab_size} must be in [1, {vocab_size}], the "
            f"target's vocabulary size; set draft.draft_vocab_size to at most {vocab_size}"
        )
    # A stable sort on -count keeps equal counts in ascending id order: deterministic ties, and
    # never-seen ids (count 0) fill the tail from the smallest id up.
    order = torch.sort(-counts, stable=True).indices
    chosen = sorted(int(i) for i in order[:draft_vocab_size])
    d2t = [t - i for i, t in enumerate(chosen)]
    return run_pb2.VocabMap(d2t=d2t, draft_token_ids=chosen, hash=vocab_map_hash(d2t, chosen))


def t2d_mask(vocab_map: run_pb2.VocabMap, vocab_size: int) -> torch.Tensor:
    """bool [vocab_size]: True for target ids in the draft vocabulary."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[torch.tensor(list(vocab_map.draft_token_ids), dtype=torch.long)] = True
    return mask


@dataclass(frozen=True)
class RunFacts:
    """What run creation learns from the target directory and the dataset."""

    num_layers: int
    hidden_size: int
    vocab_size: int
    tokenizer_hash: str
    aux_layer_ids: list[int]
    """The target layers captured (EAGLE3's aux layers, DFlash's target_layer_ids)."""
    vocab_map: run_pb2.VocabMap
    """EAGLE3's draft vocabulary; empty for the DFlash family (full target vocabulary)."""
    num_prompts: int
    """Dataset rows that became prompts."""
    mask_token_id: int | None = None
    """DFlash family: the MASK token filling blocks (None for EAGLE3)."""
    bad_rows: list[tuple[int, str]] = field(default_factory=list)
    """(1-based line, reason) of rows that cannot be trained on."""


def describe_run(model_dir: str | Path, cfg: RunConfigFile,
                 dataset_lines: Sequence[str]) -> RunFacts:
    """Read the target's config and tokenizer (not its weights) and build the vocab map."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"target.model_path {model_dir} has no config.json; point it at a "
                          "local Hugging Face model directory")
    text_config = AutoConfig.from_pretrained(model_dir).get_text_config()
    num_layers = int(text_config.num_hidden_layers)
    vocab_size = int(text_config.vocab_size)
    algorithm = cfg.draft.algorithm
    draft_layers = cfg.draft.dflash.num_hidden_layers if cfg.draft.dflash else 1
    try:
        aux = list(cfg.layer_ids() or default_layer_ids(algorithm, num_layers, draft_layers))
        plan_for(algorithm, aux, num_layers)
    except CapturePlanError as exc:
        raise ConfigError(str(exc)) from None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    good, bad = prepare_dataset(tokenizer, dataset_lines, cfg.capture.max_length,
                                cfg.capture.chat_template)
    if not good:
        raise ConfigError(f"no dataset row can be trained on ({len(bad)} bad rows; first: "
                          f"{bad[0] if bad else 'the dataset is empty'})")
    if cfg.draft.dflash is None:
        vocab_map = build_vocab_map(token_frequencies((p for _, p in good), vocab_size),
                                    cfg.draft.draft_vocab_size)
        mask_id = None
    else:
        vocab_map = run_pb2.VocabMap(hash=vocab_map_hash([], []))
        mask_id = resolve_mask_token_id(tokenizer, cfg.draft.dflash.mask_token_id, vocab_size)
    return RunFacts(
        num_layers=num_layers,
        hidden_size=int(text_config.hidden_size),
        vocab_size=vocab_size,
        tokenizer_hash=tokenizer_hash(tokenizer),
        aux_layer_ids=aux,
        vocab_map=vocab_map,
        num_prompts=len(good),
        bad_rows=bad,
        mask_token_id=mask_id,
    )


def resolve_mask_token_id(tokenizer: Any, explicit: int | None, vocab_size: int) -> int:
    """The DFlash MASK token: the config's, else the tokenizer's mask token, else the first
    embedding row no token uses (``len(tokenizer)`` when the embedding is larger), else the pad,
    eos or unk token. The MASK embedding is the target's own frozen row."""
    unused = len(tokenizer) if len(tokenizer) < vocab_size else None
    candidates = [("draft.dflash.mask_token_id", explicit),
                  ("the tokenizer's mask token", getattr(tokenizer, "mask_token_id", None)),
                  ("the first unused embedding row", unused),
                  ("the pad token", tokenizer.pad_token_id),
                  ("the eos token", tokenizer.eos_token_id),
                  ("the unk token", tokenizer.unk_token_id)]
    for source, token in candidates:
        if token is None:
            continue
        if not 0 <= int(token) < vocab_size:
            raise ConfigError(f"mask token {token} from {source} is outside the target "
                              f"vocabulary [0, {vocab_size}); set draft.dflash.mask_token_id")
        return int(token)
    raise ConfigError("no MASK token: the tokenizer has no mask, pad, eos or unk token and "
                      "every embedding row is used; set draft.dflash.mask_token_id")


def default_total_steps(cfg: RunConfigFile, num_prompts: int) -> int:
    """The run's step horizon: every sample of every epoch, in whole steps."""
    s = cfg.step
    return num_prompts * cfg.epochs // (s.world_size * s.micro_batch * s.accumulation)


def run_config_proto(cfg: RunConfigFile, facts: RunFacts,
                     model_path: str | None = None) -> run_pb2.RunConfig:
    """The wire ``RunConfig`` for ``cfg`` with the facts read from the target."""
    config = to_proto(cfg, num_layers=facts.num_layers, hidden_size=facts.hidden_size,
                      vocab_size=facts.vocab_size, tokenizer_hash=facts.tokenizer_hash,
                      aux_layer_ids=facts.aux_layer_ids, model_path=model_path,
                      mask_token_id=facts.mask_token_id)
    if not config.training.total_steps:
        config.training.total_steps = default_total_steps(cfg, facts.num_prompts)
    return config
