"""DFlash-family options and draft config: validated where built, convertible to and from the
HF ``config.json`` that SGLang's DFlash loader reads.

Two layers:

* ``DFlashOptions`` / ``DominoOptions``: what a run sets under ``draft.dflash`` / ``draft.domino``
  (the strategy factory's keyword arguments);
* ``DFlashConfig``: the resolved draft shape (target geometry + options + the captured layer
  ids), which builds the model and is exported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import Qwen3Config

ALGORITHMS = ("dflash", "domino")
LAYER_TYPES = ("full_attention", "sliding_attention")
ATTENTION_BACKENDS = ("sdpa", "eager")
_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")
SERVING_PURE_DRAFT_PREFIX_LEN = 1
"""SGLang 0.5.23 serves Domino only with a one-token pure-draft prefix."""


def _fail(section: str, name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{section}.{name}={value!r}: {why}")


@dataclass(frozen=True, kw_only=True)
class DFlashOptions:
    """Run options of a DFlash draft (``draft.dflash``)."""

    mask_token_id: int
    """Token id embedded at the masked block slots; must be a row of the target's embedding
    (often an unused row past the tokenizer, e.g. 151669 for Qwen3)."""
    num_hidden_layers: int = 1
    """Draft decoder layers."""
    block_size: int = 16
    """Tokens per draft block: the anchor plus ``block_size - 1`` proposals."""
    num_anchors: int = 512
    """Blocks sampled per row per micro-batch (fewer when the row has fewer candidates)."""
    loss_decay_gamma: float = 0.0
    """Position decay ``exp(-(k-1)/gamma)`` of the loss weight; 0 disables it (7 is usual for
    block size 16)."""
    layer_types: tuple[str, ...] | None = None
    """Per-layer ``full_attention`` / ``sliding_attention``; ``None`` means all full."""
    sliding_window: int = 0
    """Window of sliding layers, counting the current slot; required (> 0) with any."""
    attention_backend: str = "sdpa"
    """``sdpa`` or ``eager`` (the reference; equal results, more memory)."""
    objective_chunk_blocks: int = 128
    """Blocks per chunk of the logits/loss computation (checkpointed); 0 = all at once."""

    @property
    def resolved_layer_types(self) -> tuple[str, ...]:
        if self.layer_types is None:
            return ("full_attention",) * self.num_hidden_layers
        return tuple(self.layer_types)

    def check(self, section: str) -> None:
        """Raise ValueError naming the first invalid field (``section.field=value: why``)."""
        ints = ("mask_token_id", "num_hidden_layers", "block_size", "num_anchors",
                "sliding_window", "objective_chunk_blocks")
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise _fail(section, name, value, "must be an integer")
        if self.mask_token_id < 0:
            raise _fail(section, "mask_token_id", self.mask_token_id, "must be >= 0")
        if self.num_hidden_layers < 1:
            raise _fail(section, "num_hidden_layers", self.num_hidden_layers, "must be >= 1")
        if self.block_size < 2:
            raise _fail(section, "block_size", self.block_size, "must be >= 2")
        if self.num_anchors < 1:
            raise _fail(section, "num_anchors", self.num_anchors, "must be >= 1")
        if not isinstance(self.loss_decay_gamma, int | float) or self.loss_decay_gamma < 0:
            raise _fail(section, "loss_decay_gamma", self.loss_decay_gamma,
                        "must be a number >= 0 (0 disables the decay)")
        if self.objective_chunk_blocks < 0:
            raise _fail(section, "objective_chunk_blocks", self.objective_chunk_blocks,
                        "must be >= 0 (0 computes all blocks at once)")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise _fail(section, "attention_backend", self.attention_backend,
                        f"use one of {list(ATTENTION_BACKENDS)}")
        types = self.resolved_layer_types
        if len(types) != self.num_hidden_layers:
            raise _fail(section, "layer_types", list(types),
                        f"must list num_hidden_layers={self.num_hidden_layers} entries")
        bad = [t for t in types if t not in LAYER_TYPES]
        if bad:
            raise _fail(section, "layer_types", list(types),
                        f"unknown {bad}; use {list(LAYER_TYPES)}")
        if self.sliding_window < 0:
            raise _fail(section, "sliding_window", self.sliding_window, "must be >= 0")
        if "sliding_attention" in types and self.sliding_window == 0:
            raise _fail(section, "sliding_window", self.sliding_window,
                        "must be > 0 when layer_types has a sliding_attention layer")


@dataclass(frozen=True, kw_only=True)
class DominoOptions(DFlashOptions):
    """Run options of a Domino draft (``draft.domino``): DFlash plus the GRU/low-rank head."""

    emb_dim: int
    """Rank of the head's correction ``W2·SiLU(W1·[h; gru])`` (``embed_proj``)."""
    gru_hidden_dim: int
    """Hidden size of ``prefix_gru`` over the embeddings of the block's earlier tokens."""
    shift_label: bool = True
    """Block position k predicts token ``anchor+k+1`` (all k supervised) instead of
    ``anchor+k`` (k >= 1)."""
    pure_draft_prefix_len: int = 1
    """Leading proposal positions scored by the base ``lm_head`` alone (SGLang serves 1)."""
    lambda_base_start: float = 1.0
    """Weight of the base-head loss at step 0."""
    lambda_base_decay_ratio: float = 1.0
    """The base weight reaches 0 after this fraction of the run's optimizer steps."""

    @property
    def suffix_start(self) -> int:
        """First block position the correction applies to."""
        return self.pure_draft_prefix_len + (0 if self.shift_label else 1)

    def check(self, section: str) -> None:
        super().check(section)
        for name in ("emb_dim", "gru_hidden_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise _fail(section, name, value, "must be an integer > 0")
        if not isinstance(self.shift_label, bool):
            raise _fail(section, "shift_label", self.shift_label, "must be true or false")
        pure = self.pure_draft_prefix_len
        if isinstance(pure, bool) or not isinstance(pure, int) or pure < 0:
            raise _fail(section, "pure_draft_prefix_len", pure, "must be an integer >= 0")
        if self.suffix_start >= self.block_size:
            raise _fail(section, "pure_draft_prefix_len", pure,
                        f"leaves no corrected position in a block of {self.block_size}")
        start = self.lambda_base_start
        if not isinstance(start, int | float) or not 0 <= start <= 1:
            raise _fail(section, "lambda_base_start", start, "must be in [0, 1]")
        ratio = self.lambda_base_decay_ratio
        if not isinstance(ratio, int | float) or ratio <= 0:
            raise _fail(section, "lambda_base_decay_ratio", ratio, "must be > 0")

    def check_serving(self, section: str) -> None:
        """SGLang 0.5.23's Domino rules, beyond what training itself needs."""
        if self.pure_draft_prefix_len != SERVING_PURE_DRAFT_PREFIX_LEN:
            raise _fail(section, "pure_draft_prefix_len", self.pure_draft_prefix_len,
                        f"SGLang serves Domino only with {SERVING_PURE_DRAFT_PREFIX_LEN}")


def parse_options(algorithm: str, options: Mapping[str, Any]) -> DFlashOptions:
    """Typed, checked options of ``algorithm`` (``dflash`` or ``domino``)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"draft algorithm {algorithm!r} is not DFlash-family; use {ALGORITHMS}")
    cls = DominoOptions if algorithm == "domino" else DFlashOptions
    section = f"draft.{algorithm}"
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{section}: unknown option(s) {unknown}; known: {sorted(known)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if options.get(name) is None:
            raise ValueError(f"{section}.{name} is required: it has no safe default "
                             "(mask_token_id: an unused embedding row of the target)")
    values = dict(options)
    types = values.get("layer_types")
    if types is not None:
        if isinstance(types, str) or not isinstance(types, Sequence):
            raise _fail(section, "layer_types", types, "must be a list of layer types")
        values["layer_types"] = tuple(types)
    parsed = cls(**values)
    parsed.check(section)
    return parsed


def validate_options(algorithm: str, options: Mapping[str, Any],
                     target_config: Mapping[str, Any] | None) -> None:
    """Check a run's DFlash/Domino options, including the serving rules and, given the target's
    config, the ranges that depend on it; raise ValueError naming the field."""
    parsed = parse_options(algorithm, options)
    section = f"draft.{algorithm}"
    if isinstance(parsed, DominoOptions):
        parsed.check_serving(section)
    if target_config is not None:
        vocab = int(target_config["vocab_size"])
        if parsed.mask_token_id >= vocab:
            raise _fail(section, "mask_token_id", parsed.mask_token_id,
                        f"must be < the target's vocab_size {vocab}")


@dataclass(frozen=True)
class DFlashConfig:
    """The resolved draft: a Qwen3-shaped stack with the target's geometry plus DFlash keys."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    vocab_size: int
    """The target's vocabulary (embedding rows); the draft shares it."""
    num_hidden_layers: int
    num_target_layers: int
    target_layer_ids: tuple[int, ...]
    """Captured target layers, in the order their features are concatenated."""
    block_size: int
    mask_token_id: int
    layer_types: tuple[str, ...]
    sliding_window: int = 0
    """0 when no layer slides."""
    attention_bias: bool = False
    rope: dict[str, Any] = field(default_factory=dict)
    """The target's RoPE settings, as ``Qwen3Config`` keyword arguments."""
    projector_type: str = "dflash"
    """``dflash``, or ``domino`` for the GRU/low-rank head."""
    emb_dim: int = 0
    gru_hidden_dim: int = 0
    shift_label: bool = False
    pure_draft_prefix_len: int = 0
    attention_backend: str = "sdpa"
    """Training-time only; not exported."""
    objective_chunk_blocks: int = 128
    """Training-time only; not exported."""

    @property
    def is_domino(self) -> bool:
        return self.projector_type == "domino"

    @property
    def suffix_start(self) -> int:
        """First block position Domino's correction applies to."""
        return self.pure_draft_prefix_len + (0 if self.shift_label else 1)

    @classmethod
    def from_target(cls, target_config: Mapping[str, Any], options: DFlashOptions,
                    target_layer_ids: Sequence[int]) -> DFlashConfig:
        """The draft for ``options`` around a target (its HF text config)."""
        hidden = int(target_config["hidden_size"])
        heads = int(target_config["num_attention_heads"])
        domino = (
            dict(projector_type="domino", emb_dim=options.emb_dim,
                 gru_hidden_dim=options.gru_hidden_dim, shift_label=options.shift_label,
                 pure_draft_prefix_len=options.pure_draft_prefix_len)
            if isinstance(options, DominoOptions) else {}
        )
        return cls(
            hidden_size=hidden,
            intermediate_size=int(target_config["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(target_config.get("num_key_value_heads") or heads),
            head_dim=int(target_config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(target_config.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(target_config.get("max_position_embeddings", 4096)),
            vocab_size=int(target_config["vocab_size"]),
            num_hidden_layers=options.num_hidden_layers,
            num_target_layers=int(target_config["num_hidden_layers"]),
            target_layer_ids=tuple(int(i) for i in target_layer_ids),
            block_size=options.block_size,
            mask_token_id=options.mask_token_id,
            layer_types=options.resolved_layer_types,
            sliding_window=options.sliding_window,
            attention_bias=bool(target_config.get("attention_bias", False)),
            rope={k: target_config[k] for k in _ROPE_KEYS if target_config.get(k) is not None},
            attention_backend=options.attention_backend,
            objective_chunk_blocks=options.objective_chunk_blocks,
            **domino,
        )

    def qwen3_config(self) -> Qwen3Config:
        """The equivalent ``Qwen3Config`` (RoPE and the exported base fields)."""
        sliding = "sliding_attention" in self.layer_types
        return Qwen3Config(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            vocab_size=self.vocab_size,
            num_hidden_layers=self.num_hidden_layers,
            attention_bias=self.attention_bias,
            hidden_act="silu",
            tie_word_embeddings=False,
            use_sliding_window=sliding,
            sliding_window=self.sliding_window if sliding else None,
            max_window_layers=self.num_hidden_layers,
            layer_types=list(self.layer_types),
            **self.rope,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """``config.json`` of the export (what SGLang's DFlash loader reads)."""
        config = self.qwen3_config().to_dict()
        for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype",
                    "architectures", "auto_map"):
            config.pop(key, None)
        rope = config.get("rope_parameters") or {}
        # Legacy RoPE keys too, for readers that predate ``rope_parameters``.
        if "rope_theta" in rope:
            config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        dflash_config: dict[str, Any] = {
            "target_layer_ids": list(self.target_layer_ids),
            "mask_token_id": self.mask_token_id,
        }
        if self.is_domino:
            dflash_config.update(
                projector_type="domino",
                pure_draft_prefix_len=self.pure_draft_prefix_len,
                shift_label=self.shift_label,
                emb_dim=self.emb_dim,
                gru_hidden_dim=self.gru_hidden_dim,
            )
        config.update(
            architectures=["DFlashDraftModel"],
            model_type="qwen3",
            block_size=self.block_size,
            num_target_layers=self.num_target_layers,
            layer_types=list(self.layer_types),
            dflash_config=dflash_config,
        )
        if "sliding_attention" in self.layer_types:
            config["sliding_window"] = self.sliding_window
        else:
            config.pop("sliding_window", None)
        return config

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any]) -> DFlashConfig:
        """Inverse of ``to_hf_dict`` (training-time fields take their defaults)."""
        dflash = config["dflash_config"]
        if config.get("rope_parameters"):
            rope = {"rope_parameters": dict(config["rope_parameters"])}
        else:
            rope = {k: config[k] for k in _ROPE_KEYS if config.get(k) is not None}
        domino = dflash.get("projector_type", "dflash") == "domino"
        layers = int(config["num_hidden_layers"])
        return cls(
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_attention_heads=int(config["num_attention_heads"]),
            num_key_value_heads=int(config["num_key_value_heads"]),
            head_dim=int(config["head_dim"]),
            rms_norm_eps=float(config["rms_norm_eps"]),
            max_position_embeddings=int(config["max_position_embeddings"]),
            vocab_size=int(config["vocab_size"]),
            num_hidden_layers=layers,
            num_target_layers=int(config["num_target_layers"]),
            target_layer_ids=tuple(int(i) for i in dflash["target_layer_ids"]),
            block_size=int(config["block_size"]),
            mask_token_id=int(dflash["mask_token_id"]),
            layer_types=tuple(config.get("layer_types") or ("full_attention",) * layers),
            sliding_window=int(config.get("sliding_window") or 0),
            attention_bias=bool(config.get("attention_bias", False)),
            rope=rope,
            projector_type="domino" if domino else "dflash",
            emb_dim=int(dflash["emb_dim"]) if domino else 0,
            gru_hidden_dim=int(dflash["gru_hidden_dim"]) if domino else 0,
            shift_label=bool(dflash.get("shift_label", False)) if domino else False,
            pure_draft_prefix_len=int(dflash.get("pure_draft_prefix_len", 0)) if domino else 0,
        )
