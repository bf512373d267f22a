"""Request validation that needs no database: field by field, with the field's name in the error."""

from __future__ import annotations

import math
import re
from urllib.parse import urlsplit

from google.protobuf.message import Message

from services.api import common_pb2, run_pb2
from services.capture import (
    DFLASH_FAMILY,
    FINAL_HIDDEN_TENSOR,
    CapturePlan,
    CapturePlanError,
    plan_for,
)
from services.config import MAX_EPOCHS
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
        plan_for(cfg.draft.algorithm, list(cfg.capture.aux_layer_ids), t.num_layers)
    except CapturePlanError as exc:
        raise InvalidArgument(f"config.{exc}") from None
    positive(cfg.capture.max_length, "config.capture.max_length")
    if cfg.draft.algorithm in DFLASH_FAMILY:
        dflash_draft(cfg, vocab)
    else:
        eagle3_draft(cfg, vocab)
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
    if cfg.HasField("regenerate"):
        regenerate(cfg.regenerate)


def regenerate(r: run_pb2.RegenerateConfig) -> None:
    """The generation settings of a run that regenerates its answers (``services.config``)."""
    if r.mode not in ("greedy", "sample"):
        raise InvalidArgument(f"config.regenerate.mode: {r.mode!r}; use greedy or sample")
    if r.on_truncation not in ("keep", "drop"):
        raise InvalidArgument(
            f"config.regenerate.on_truncation: {r.on_truncation!r}; use keep or drop")
    positive(r.max_new_tokens, "config.regenerate.max_new_tokens")
    if r.mode == "sample":
        positive(r.temperature, "config.regenerate.temperature")
        if not 0 < r.top_p <= 1:
            raise InvalidArgument(f"config.regenerate.top_p: {r.top_p}; must be in (0, 1]")
        if r.top_k < 0:
            raise InvalidArgument(f"config.regenerate.top_k: {r.top_k}; must be >= 0")
    if r.seed < 0:
        raise InvalidArgument(f"config.regenerate.seed: {r.seed}; must be >= 0")


def eagle3_draft(cfg: run_pb2.RunConfig, vocab: run_pb2.VocabMap) -> None:
    """EAGLE3 drafts over a vocabulary map of ``draft_vocab_size`` target tokens."""
    t = cfg.target
    positive(cfg.draft.draft_vocab_size, "config.draft.draft_vocab_size")
    positive(cfg.draft.ttt_length, "config.draft.ttt_length")
    if cfg.draft.draft_vocab_size > t.vocab_size:
        raise InvalidArgument(
            f"config.draft.draft_vocab_size: {cfg.draft.draft_vocab_size} exceeds the target "
            f"vocabulary ({t.vocab_size})"
        )
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


ATTENTION_BACKENDS = ("sdpa", "eager")
LAYER_TYPES = ("full_attention", "sliding_attention")


def dflash_draft(cfg: run_pb2.RunConfig, vocab: run_pb2.VocabMap) -> None:
    """The DFlash family drafts over the full target vocabulary (no vocabulary map) from K
    captured layers; Domino also needs its head and a step horizon for its curriculum."""
    d, f = cfg.draft, cfg.draft.dflash
    name = d.algorithm
    if d.draft_vocab_size or d.ttt_length:
        raise InvalidArgument(f"config.draft.draft_vocab_size/ttt_length: apply to eagle3 only, "
                              f"not {name}")
    if not d.HasField("dflash"):
        raise InvalidArgument(f"config.draft.dflash: required for {name}")
    if vocab.d2t or vocab.draft_token_ids or vocab.hash != vocab_map_hash([], []):
        raise InvalidArgument(f"vocab_map: must be empty for {name}, which drafts over the "
                              "full target vocabulary")
    positive(f.num_hidden_layers, "config.draft.dflash.num_hidden_layers")
    if f.block_size < 2:
        raise InvalidArgument(f"config.draft.dflash.block_size: must be >= 2, got {f.block_size}")
    positive(f.num_anchors, "config.draft.dflash.num_anchors")
    if not math.isfinite(f.loss_decay_gamma) or f.loss_decay_gamma < 0:
        raise InvalidArgument("config.draft.dflash.loss_decay_gamma: must be finite and >= 0 "
                              f"(0 disables the decay), got {f.loss_decay_gamma}")
    if not 0 <= f.mask_token_id < cfg.target.vocab_size:
        raise InvalidArgument(f"config.draft.dflash.mask_token_id: {f.mask_token_id} is outside "
                              f"the target vocabulary [0, {cfg.target.vocab_size})")
    if len(f.layer_types) != f.num_hidden_layers or any(
            x not in LAYER_TYPES for x in f.layer_types):
        raise InvalidArgument(f"config.draft.dflash.layer_types: one of {LAYER_TYPES} per draft "
                              f"layer ({f.num_hidden_layers}), got {list(f.layer_types)}")
    if "sliding_attention" in f.layer_types and f.sliding_window <= 0:
        raise InvalidArgument("config.draft.dflash.sliding_window: must be > 0 when a layer is "
                              "sliding_attention")
    if f.attention_backend not in ATTENTION_BACKENDS:
        raise InvalidArgument(f"config.draft.dflash.attention_backend: {f.attention_backend!r}; "
                              f"use one of {ATTENTION_BACKENDS}")
    if f.objective_chunk_blocks < 0:
        raise InvalidArgument("config.draft.dflash.objective_chunk_blocks: must be >= 0")
    if name != "domino":
        if d.HasField("domino"):
            raise InvalidArgument("config.draft.domino: applies to domino only")
        return
    if not d.HasField("domino"):
        raise InvalidArgument("config.draft.domino: required for domino (emb_dim, "
                              "gru_hidden_dim)")
    m = d.domino
    positive(m.emb_dim, "config.draft.domino.emb_dim")
    positive(m.gru_hidden_dim, "config.draft.domino.gru_hidden_dim")
    if m.pure_draft_prefix_len != 1:
        raise InvalidArgument("config.draft.domino.pure_draft_prefix_len: must be 1, the only "
                              f"value SGLang serves; got {m.pure_draft_prefix_len}")
    if not 0 <= m.lambda_base_start <= 1:
        raise InvalidArgument("config.draft.domino.lambda_base_start: must be in [0, 1]")
    if not 0 < m.lambda_base_decay_ratio <= 1:
        raise InvalidArgument("config.draft.domino.lambda_base_decay_ratio: must be in (0, 1]")
    if cfg.training.total_steps <= 0:
        raise InvalidArgument(
            "config.training.total_steps: domino needs the run's step horizon for its "
            "base-loss schedule; set training.total_steps, or give a dataset large enough "
            "for at least one step")


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


FLOAT_DTYPES = (common_pb2.DTYPE_BFLOAT16, common_pb2.DTYPE_FLOAT16, common_pb2.DTYPE_FLOAT32)
TOKEN_DTYPES = {"input_ids": (common_pb2.DTYPE_INT64,),
                "loss_mask": (common_pb2.DTYPE_UINT8, common_pb2.DTYPE_BOOL)}


def ref_mismatch(ref: common_pb2.SampleRef, cfg: run_pb2.RunConfig) -> str | None:
    """Why a structurally valid ref cannot be a sample of this run (None when it can): its
    capture plan, tensor names, dtypes and shapes must be the ones the run's plan produces."""
    t = cfg.target
    plan = plan_for(cfg.draft.algorithm or "eagle3", list(cfg.capture.aux_layer_ids),
                    t.num_layers)
    if ref.HasField("capture") and CapturePlan.from_proto(ref.capture) != plan:
        return (f"captured with plan {CapturePlan.from_proto(ref.capture)}, this run captures "
                f"{plan}")
    names = [spec.name for spec in ref.tensors]
    if sorted(names) != sorted(plan.tensors):
        return f"tensors {names}; samples of this run hold {list(plan.tensors)}"
    n = ref.num_tokens
    if n > cfg.capture.max_length:
        return f"num_tokens {n} exceeds capture.max_length {cfg.capture.max_length}"
    widths = {plan.layers_tensor: len(plan.layer_ids) * t.hidden_size,
              FINAL_HIDDEN_TENSOR: t.hidden_size}
    for spec in ref.tensors:
        width = widths.get(spec.name)
        shape = [n] if width is None else [n, width]
        if list(spec.shape) != shape:
            return f"{spec.name} has shape {list(spec.shape)}, expected {shape}"
        allowed = TOKEN_DTYPES.get(spec.name, FLOAT_DTYPES)
        if spec.dtype not in allowed:
            return (f"{spec.name} has dtype {common_pb2.DType.Name(spec.dtype)}, expected one "
                    f"of {[common_pb2.DType.Name(d) for d in allowed]}")
    return None


# ---------------------------------------------------------------------------- ranges and limits
#
# Every numeric field of a RunConfig has a range, checked on the server whatever the client
# sent (NaN and infinities included). The upper bounds refuse the absurd before it exhausts the
# coordinator's memory or holds the database's write lock for long; they are documented in
# README.md ("Limits"), and a test holds each one.

MAX_SAMPLES_PER_RUN = 2_000_000
"""Prompts x epochs: every sample row is created with the run (in short transactions)."""
MAX_LENGTH = 1 << 20
MAX_TTT_LENGTH = 64

INT_RANGES: dict[str, tuple[int, int]] = {
    "target.num_layers": (1, 1024),
    "target.hidden_size": (1, 1 << 17),
    "target.vocab_size": (1, 1 << 23),
    "capture.max_length": (1, MAX_LENGTH),
    # 0 for algorithms without them; each algorithm's own check requires what it uses.
    "draft.draft_vocab_size": (0, 1 << 23),
    "draft.ttt_length": (0, MAX_TTT_LENGTH),
    "step.world_size": (1, 4096),
    "step.micro_batch": (1, 4096),
    "step.accumulation": (1, 4096),
    "training.warmup_steps": (0, 1_000_000_000),
    "training.checkpoint_every": (1, 1_000_000_000),
    "lease.heartbeat_misses": (1, 1000),
    "lease.max_attempts": (1, 1000),
    "lease.max_deliveries": (1, 1000),
    "watermark.high_samples": (0, 1 << 62),
    "watermark.low_samples": (0, 1 << 62),
    "watermark.high_bytes": (0, 1 << 62),
    "watermark.low_bytes": (0, 1 << 62),
    "epochs": (1, MAX_EPOCHS),
}
"""Inclusive ranges of integer fields, by path under ``config``."""

FLOAT_RANGES: dict[str, tuple[float, float, bool]] = {
    "training.learning_rate": (0.0, 1.0, False),
    "training.max_grad_norm": (0.0, 1e6, True),
    "lease.lease_seconds": (0.0, 7 * 86400.0, False),
    "lease.heartbeat_seconds": (0.0, 3600.0, False),
    "watermark.retry_after_seconds": (0.0, 3600.0, True),
}
"""(low, high, whether low itself is allowed) of float fields; every float must be finite."""


def _field(cfg: run_pb2.RunConfig, path: str) -> float:
    value: object = cfg
    for part in path.split("."):
        value = getattr(value, part)
    return value  # type: ignore[return-value]


def run_limits(cfg: run_pb2.RunConfig) -> None:
    """Refuse a value outside its field's range, a NaN or infinity, a retain policy that does
    not exist, and a watermark below one step's samples (``run_config`` checks the algorithm)."""
    for path, (lo, hi) in INT_RANGES.items():
        value = int(_field(cfg, path))
        if not lo <= value <= hi:
            raise InvalidArgument(f"config.{path}: must be in [{lo}, {hi}], got {value}")
    for path, (lo, hi, lo_ok) in FLOAT_RANGES.items():
        value = float(_field(cfg, path))
        if not math.isfinite(value):
            raise InvalidArgument(f"config.{path}: must be a finite number, got {value}")
        if not ((lo <= value if lo_ok else lo < value) and value <= hi):
            low = "[" if lo_ok else "("
            raise InvalidArgument(f"config.{path}: must be in {low}{lo:g}, {hi:g}], got {value}")
    if cfg.retain not in run_pb2.RetainPolicy.values():
        raise InvalidArgument(f"config.retain: {cfg.retain} is not a RetainPolicy; use STEP or "
                              "CHECKPOINT")
    step = cfg.step.world_size * cfg.step.micro_batch * cfg.step.accumulation
    w = cfg.watermark
    if w.high_samples and w.high_samples < step:
        raise InvalidArgument(
            f"config.watermark.high_samples: {w.high_samples} is below one step's "
            f"{step} samples (world_size x micro_batch x accumulation), so no step could ever "
            f"fill; set it to at least {step} (twice that keeps the next step captured while "
            "one trains), or 0 for no limit")


def run_size(prompts: int, epochs: int) -> None:
    """Refuse a run of more samples than ``MAX_SAMPLES_PER_RUN``."""
    if prompts * epochs > MAX_SAMPLES_PER_RUN:
        raise InvalidArgument(
            f"config.epochs: {prompts} prompts x {epochs} epochs = {prompts * epochs} samples, "
            f"more than the {MAX_SAMPLES_PER_RUN} a run may hold; use fewer epochs or split "
            "the dataset into several runs")


def dataset_lines(count: int) -> None:
    """Refuse a dataset longer than a run could hold, before parsing it."""
    if count > MAX_SAMPLES_PER_RUN:
        raise InvalidArgument(
            f"dataset_lines: more than {MAX_SAMPLES_PER_RUN} lines, more samples than a run "
            "may hold; split the dataset into several runs")


def config_differences(old: Message, new: Message, prefix: str = "config") -> list[str]:
    """Paths of the fields whose values differ between two messages of one type."""
    out: list[str] = []
    for fd in old.DESCRIPTOR.fields:
        path = f"{prefix}.{fd.name}"
        a, b = getattr(old, fd.name), getattr(new, fd.name)
        if fd.message_type is not None and not fd.is_repeated:
            out.extend(config_differences(a, b, path))
        elif list(a) != list(b) if fd.is_repeated else a != b:
            out.append(path)
    return out


MAX_URI_CHARS = 4096


def checkpoint_uri(uri: str, field: str = "uri") -> str:
    """A checkpoint URI a trainer can load: ``file://`` and an absolute path, nothing else."""
    required(uri, field)
    if len(uri) > MAX_URI_CHARS:
        raise InvalidArgument(f"{field}: {len(uri)} characters, at most {MAX_URI_CHARS}")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in uri):
        raise InvalidArgument(f"{field}: control characters are not allowed")
    parts = urlsplit(uri)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        raise InvalidArgument(
            f"{field}: {uri[:200]!r} must be a file:// URI of this cluster's checkpoint "
            "directory (file:///ABSOLUTE/PATH), the only kind trainers load")
    if not parts.path.startswith("/") or parts.query or parts.fragment:
        raise InvalidArgument(f"{field}: {uri[:200]!r} must be file:///ABSOLUTE/PATH, without "
                              "query or fragment")
    return uri
