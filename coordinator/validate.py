"""Request validation that needs no database: field by field, with the field's name in the error."""

from __future__ import annotations

import re

from services.api import common_pb2, run_pb2
from services.config import ConfigError, validate_aux_layers
from services.errors import InvalidArgument
from services.fingerprint import vocab_map_hash
from services.tensors import validate_specs

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_BATCH = 4096


def run_id(value: str, field: str = "run_id") -> str:
    if not value:
        raise InvalidArgument(f"{field}: required")
    if not RUN_ID_RE.match(value):
        raise InvalidArgument(f"{field}: {value!r} must match {RUN_ID_RE.pattern}")
    return value


def required(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field}: required")
    return value


def batch(items: object, field: str, max_items: int = MAX_BATCH) -> None:
    n = len(items)  # type: ignore[arg-type]
    if n == 0:
        raise InvalidArgument(f"{field}: at least one entry is required")
    if n > max_items:
        raise InvalidArgument(f"{field}: {n} entries, at most {max_items} per call")


def positive(value: float, field: str) -> None:
    if value <= 0:
        raise InvalidArgument(f"{field}: must be > 0, got {value}")


def run_config(cfg: run_pb2.RunConfig, vocab: run_pb2.VocabMap) -> None:
    """Refuse a config that could not train; every message names the field."""
    t = cfg.target
    required(t.model_path, "config.target.model_path")
    required(t.tokenizer_hash, "config.target.tokenizer_hash")
    for name in ("num_layers", "hidden_size", "vocab_size"):
        positive(getattr(t, name), f"config.target.{name}")
    try:
        validate_aux_layers(list(cfg.capture.aux_layer_ids), t.num_layers)
    except ConfigError as exc:
        raise InvalidArgument(f"config.{exc}") from None
    positive(cfg.capture.max_length, "config.capture.max_length")
    required(cfg.draft.algorithm, "config.draft.algorithm")
    positive(cfg.draft.draft_vocab_size, "config.draft.draft_vocab_size")
    positive(cfg.draft.ttt_length, "config.draft.ttt_length")
    if cfg.draft.draft_vocab_size > t.vocab_size:
        raise InvalidArgument(
            f"config.draft.draft_vocab_size: {cfg.draft.draft_vocab_size} exceeds the target "
            f"vocabulary ({t.vocab_size})"
        )
    for name in ("world_size", "micro_batch", "accumulation"):
        positive(getattr(cfg.step, name), f"config.step.{name}")
    positive(cfg.epochs, "config.epochs")
    for name in ("lease_seconds", "heartbeat_seconds", "heartbeat_misses", "max_attempts",
                 "max_deliveries"):
        positive(getattr(cfg.lease, name), f"config.lease.{name}")
    positive(cfg.training.checkpoint_every, "config.training.checkpoint_every")
    positive(cfg.training.learning_rate, "config.training.learning_rate")
    w = cfg.watermark
    if w.high_samples and w.low_samples > w.high_samples:
        raise InvalidArgument("config.watermark.low_samples: must be <= high_samples")
    if w.high_bytes and w.low_bytes > w.high_bytes:
        raise InvalidArgument("config.watermark.low_bytes: must be <= high_bytes")
    if cfg.retain == run_pb2.RETAIN_POLICY_UNSPECIFIED:
        raise InvalidArgument("config.retain: RETAIN_POLICY_UNSPECIFIED; use STEP or CHECKPOINT")
    if len(vocab.d2t) != cfg.draft.draft_vocab_size:
        raise InvalidArgument(
            f"vocab_map.d2t: {len(vocab.d2t)} entries, expected draft_vocab_size "
            f"{cfg.draft.draft_vocab_size}"
        )
    if len(vocab.draft_token_ids) != len(vocab.d2t):
        raise InvalidArgument("vocab_map.draft_token_ids: must have as many entries as d2t")
    ids = list(vocab.draft_token_ids)
    if any(i < 0 or i >= t.vocab_size for i in ids) or len(set(ids)) != len(ids):
        raise InvalidArgument("vocab_map.draft_token_ids: must be distinct target token ids")
    if any(ids[i] - i != vocab.d2t[i] for i in range(len(ids))):
        raise InvalidArgument("vocab_map.d2t: must equal draft_token_ids[i] - i")
    if vocab.hash != vocab_map_hash(list(vocab.d2t), ids):
        raise InvalidArgument("vocab_map.hash: does not match its content")


def sample_ref(ref: common_pb2.SampleRef, field: str, run: str) -> None:
    """Structural checks of a committed ref (state checks happen in the transaction)."""
    required(ref.sample_id, f"{field}.sample_id")
    required(ref.prompt_id, f"{field}.prompt_id")
    required(ref.store, f"{field}.store")
    if ref.run_id != run:
        raise InvalidArgument(f"{field}.run_id: {ref.run_id!r} is not this session's run {run!r}")
    if ref.sample_id != f"{ref.prompt_id}:e{ref.epoch}":
        raise InvalidArgument(
            f"{field}.sample_id: {ref.sample_id!r} must be '{{prompt_id}}:e{{epoch}}'"
        )
    if ref.generation < 0:
        raise InvalidArgument(f"{field}.generation: must be >= 0")
    if ref.num_tokens <= 0:
        raise InvalidArgument(f"{field}.num_tokens: must be > 0")
    if not ref.tensors:
        raise InvalidArgument(f"{field}.tensors: at least one tensor is required")
    if "/" in ref.store:
        raise InvalidArgument(f"{field}.store: must not contain '/'")
    prefix = f"{ref.store}/{ref.run_id}/{ref.sample_id}/g{ref.generation}/"
    validate_specs(ref.tensors, f"{field}.tensors", key_prefix=prefix)
