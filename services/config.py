"""The run configuration: a YAML file people write, validated here, sent as ``RunConfig``.

Every field has a docstring; every error says which field is wrong and how to fix it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.api import run_pb2
from services.capture import CapturePlanError, default_layer_ids, validate_layer_ids

MAX_EPOCHS = 1000
"""Most epochs a run may have; the coordinator refuses more (README "Limits")."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class TargetSection(_Section):
    model_path: str
    """Directory of the target model (HF layout) on producer and trainer nodes."""
    revision: str = ""
    """Stable label of the target weights (e.g. a commit hash); part of the fingerprint."""


class CaptureSection(_Section):
    aux_layer_ids: list[int] | None = None
    """EAGLE3: three distinct ascending target layers concatenated into aux_hidden_state;
    default [1, N//2-1, N-4]. DFlash and Domino name theirs in draft.dflash.target_layer_ids."""
    max_length: int = Field(2048, gt=0)
    """Prompts are truncated to this many tokens."""
    chat_template: str | None = None
    """Jinja chat template; default: the tokenizer's own."""


class DFlashSection(_Section):
    """The block-diffusion draft of ``dflash`` and ``domino``."""

    num_hidden_layers: int = Field(1, gt=0, le=64)
    """Decoder layers of the draft."""
    target_layer_ids: list[int] | None = None
    """Target layers captured into hidden_states (ascending, in [0, N-2]); default: the middle
    layer for one draft layer, else evenly spread from 1 to N-3."""
    block_size: int = Field(16, ge=2, le=64)
    """Tokens per block: the anchor plus block_size - 1 drafted tokens."""
    num_anchors: int = Field(512, gt=0, le=4096)
    """Blocks sampled per sequence per step."""
    loss_decay_gamma: float = Field(0.0, ge=0, allow_inf_nan=False)
    """Block position k >= 1 weighs exp(-(k-1)/gamma) in the loss; 0 weighs all alike.
    7 suits block_size 16, 5 suits 10, 4 suits 8."""
    mask_token_id: int | None = Field(None, ge=0)
    """Token filling a block after its anchor. Default: the tokenizer's mask token, else the
    first unused embedding row (len(tokenizer) when the embedding is larger), else pad/eos."""
    layer_types: list[Literal["full_attention", "sliding_attention"]] | None = None
    """Attention of each draft layer; default all full_attention."""
    sliding_window: int = Field(0, ge=0)
    """Window of sliding_attention layers in tokens (required when any layer slides)."""
    attention_backend: Literal["sdpa", "eager"] = "sdpa"
    """Attention implementation used for training."""
    objective_chunk_blocks: int = Field(128, ge=0)
    """Blocks per chunk of the loss (bounds logits memory); 0 computes all at once."""

    @model_validator(mode="after")
    def _layers_consistent(self) -> DFlashSection:
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"draft.dflash.layer_types lists {len(self.layer_types)} layers, "
                f"num_hidden_layers is {self.num_hidden_layers}")
        if (self.layer_types and "sliding_attention" in self.layer_types
                and self.sliding_window <= 0):
            raise ValueError("draft.dflash.sliding_window must be > 0 when a layer is "
                             "sliding_attention")
        return self


class DominoSection(_Section):
    """Domino's correction head (a GRU over previous tokens plus a low-rank projector)."""

    emb_dim: int = Field(gt=0)
    """Width of the projector's hidden layer (256 for Qwen3-8B)."""
    gru_hidden_dim: int = Field(gt=0)
    """Hidden size of the GRU (1024 for Qwen3-8B)."""
    shift_label: bool = True
    """Block position k predicts the token at anchor + 1 + k, every position supervised."""
    pure_draft_prefix_len: Literal[1] = 1
    """Leading positions left to the base logits; SGLang serves only 1."""
    lambda_base_start: float = Field(1.0, ge=0, le=1)
    """Weight of the base (backbone-only) loss at step 0."""
    lambda_base_decay_ratio: float = Field(1.0, gt=0, le=1)
    """The base-loss weight falls linearly to 0 over this fraction of training.total_steps."""


class DraftSection(_Section):
    algorithm: Literal["eagle3", "dflash", "domino"] = "eagle3"
    """Draft strategy: eagle3, dflash (block diffusion) or domino (dflash plus a GRU head)."""
    draft_vocab_size: int = Field(32000, gt=0)
    """EAGLE3: size of the draft vocabulary; the most frequent loss-masked target tokens."""
    ttt_length: int = Field(7, gt=0, le=64)
    """EAGLE3: training-time-test unroll length."""
    dflash: DFlashSection | None = None
    """DFlash and Domino: the draft (defaults apply when omitted)."""
    domino: DominoSection | None = None
    """Domino: the correction head; required for domino."""

    @model_validator(mode="after")
    def _fields_fit_algorithm(self) -> DraftSection:
        family = self.algorithm in ("dflash", "domino")
        if family:
            wrong = sorted({"draft_vocab_size", "ttt_length"} & self.model_fields_set)
            if wrong:
                raise ValueError(f"draft.{wrong[0]} applies to eagle3 only; "
                                 f"{self.algorithm} drafts over the full target vocabulary")
            if self.dflash is None:
                self.dflash = DFlashSection()
        elif self.dflash is not None:
            raise ValueError("draft.dflash applies to dflash and domino only")
        if self.algorithm == "domino" and self.domino is None:
            raise ValueError("draft.domino is required for domino: set emb_dim and "
                             "gru_hidden_dim (e.g. 256 and 1024 for a Qwen3-8B target)")
        if self.algorithm != "domino" and self.domino is not None:
            raise ValueError("draft.domino applies to domino only")
        return self


class StepSection(_Section):
    world_size: int = Field(1, gt=0)
    """Trainer ranks; one optimizer step reads world_size x micro_batch x accumulation samples."""
    micro_batch: int = Field(1, gt=0)
    """Samples per rank per forward pass."""
    accumulation: int = Field(1, gt=0)
    """Micro-batches per rank per optimizer step."""


class TrainingSection(_Section):
    learning_rate: float = Field(1e-4, gt=0)
    """Peak AdamW learning rate."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps."""
    checkpoint_every: int = Field(100, gt=0)
    """Write and commit a checkpoint every this many steps."""
    seed: int = 0
    """Seed for the draft's initialisation and any sampling."""
    max_grad_norm: float = Field(0.5, ge=0)
    """Gradient clipping norm; 0 disables clipping."""
    total_steps: int | None = Field(None, gt=0)
    """Optimizer steps the run trains, the horizon of schedules (Domino's base-loss weight);
    default: samples (prompts x epochs) over samples per step, fixed at run creation."""


class LeaseSection(_Section):
    lease_seconds: float = Field(120.0, gt=0)
    """How long a producer holds a prompt before it goes back to PENDING."""
    heartbeat_seconds: float = Field(5.0, gt=0)
    """How often workers heartbeat."""
    heartbeat_misses: int = Field(3, gt=0)
    """Missed heartbeats after which a session expires with its leases."""
    max_attempts: int = Field(3, gt=0)
    """Capture attempts per prompt before it is DEAD."""
    max_deliveries: int = Field(3, gt=0)
    """Losses of one sample's tensors before the sample is DEAD."""


class WatermarkSection(_Section):
    high_samples: int = Field(4096, ge=0)
    """Stop handing out prompts above this many READY+ASSIGNED samples (0: no limit)."""
    low_samples: int = Field(2048, ge=0)
    """Resume below this many."""
    high_bytes: int = Field(0, ge=0)
    """Same, in bytes held in the feature store (0: no limit)."""
    low_bytes: int = Field(0, ge=0)
    """Resume below this many bytes."""
    retry_after_seconds: float = Field(1.0, gt=0)
    """What producers are told to wait while throttled."""

    @model_validator(mode="after")
    def _low_below_high(self) -> WatermarkSection:
        if self.high_samples and self.low_samples > self.high_samples:
            raise ValueError("watermark.low_samples must be <= watermark.high_samples")
        if self.high_bytes and self.low_bytes > self.high_bytes:
            raise ValueError("watermark.low_bytes must be <= watermark.high_bytes")
        return self


class RegenerateSection(_Section):
    """Regenerate every assistant turn with the target before capture (system and user turns
    are kept), so the draft learns what the target says rather than what the dataset says."""

    mode: Literal["greedy", "sample"] = "greedy"
    """greedy: the target's most likely continuation; sample: draw with temperature/top_p/top_k."""
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    """Sampling temperature; sample mode only."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass; 1 disables it. Sample mode only."""
    top_k: int = Field(0, ge=0)
    """Sample among the k most likely tokens; 0 disables it. Sample mode only."""
    max_new_tokens: int = Field(512, gt=0)
    """Most tokens generated per assistant turn (the capture's max_length also bounds them)."""
    seed: int = Field(0, ge=0, lt=2**63)
    """Sampling seed; with the prompt (and the epoch when per_epoch) it fixes every response,
    so a restarted producer or a recapture generates the same tokens."""
    per_epoch: bool = False
    """Regenerate every epoch (fresh responses each pass); false: the same ones every epoch."""
    on_truncation: Literal["keep", "drop"] = "keep"
    """A turn that hits max_new_tokens: keep it as generated, or drop the sample (it goes DEAD
    with the reason and is counted in the producer's status)."""

    @model_validator(mode="after")
    def _sampling_fields_need_sample(self) -> RegenerateSection:
        if self.mode == "greedy":
            wrong = sorted({"temperature", "top_p", "top_k"} & self.model_fields_set)
            if wrong:
                raise ValueError(f"regenerate.{wrong[0]} applies to mode: sample only; "
                                 "set mode: sample or remove it")
        return self


class RunConfigFile(_Section):
    """A run as people write it in YAML."""

    run_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """Name of the run: letters, digits, '_', '.', '-'; used in store keys."""
    dataset: str
    """JSONL file of ShareGPT-style conversations; relative paths are relative to the config."""
    epochs: int = Field(1, gt=0, le=MAX_EPOCHS)
    """Passes over the dataset (at most 1000); each prompt is captured once per epoch."""
    retain: Literal["step", "checkpoint"] = "step"
    """Free a sample's tensors when its step is committed, or when a checkpoint covers it."""
    target: TargetSection
    capture: CaptureSection = CaptureSection()
    draft: DraftSection = DraftSection()
    step: StepSection = StepSection()
    training: TrainingSection = TrainingSection()
    lease: LeaseSection = LeaseSection()
    watermark: WatermarkSection = WatermarkSection()
    regenerate: RegenerateSection | None = None
    """Regenerate assistant turns with the target before capture; omitted: train on the
    dataset's own answers."""

    @model_validator(mode="after")
    def _capture_fits_algorithm(self) -> RunConfigFile:
        if self.draft.algorithm != "eagle3" and self.capture.aux_layer_ids is not None:
            raise ValueError("capture.aux_layer_ids applies to eagle3 only; "
                             f"{self.draft.algorithm} captures draft.dflash.target_layer_ids")
        return self

    def layer_ids(self) -> list[int] | None:
        """The target layers this config names for capture, if any."""
        if self.draft.dflash is not None:
            return self.draft.dflash.target_layer_ids
        return self.capture.aux_layer_ids

    def dataset_path(self, config_path: Path) -> Path:
        p = Path(self.dataset).expanduser()
        return p if p.is_absolute() else (config_path.parent / p)

    def model_path(self, config_path: Path) -> Path:
        p = Path(self.target.model_path).expanduser()
        return p if p.is_absolute() else (config_path.parent / p)


class ConfigError(ValueError):
    """The config file cannot be used; the message says what to change."""


def load_run_config(path: str | Path) -> RunConfigFile:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return RunConfigFile.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        ]
        raise ConfigError(f"{path} has invalid fields:\n" + "\n".join(lines)) from None


def draft_proto(draft: DraftSection, mask_token_id: int | None = None) -> run_pb2.DraftConfig:
    """The wire ``DraftConfig``; ``mask_token_id`` is the one run creation resolved."""
    if draft.dflash is None:
        return run_pb2.DraftConfig(algorithm=draft.algorithm,
                                   draft_vocab_size=draft.draft_vocab_size,
                                   ttt_length=draft.ttt_length)
    d = draft.dflash
    resolved = d.mask_token_id if d.mask_token_id is not None else mask_token_id
    if resolved is None:
        raise ConfigError("draft.dflash.mask_token_id: could not be resolved; set it")
    msg = run_pb2.DraftConfig(
        algorithm=draft.algorithm,
        dflash=run_pb2.DFlashConfig(
            num_hidden_layers=d.num_hidden_layers, block_size=d.block_size,
            num_anchors=d.num_anchors, loss_decay_gamma=d.loss_decay_gamma,
            mask_token_id=resolved,
            layer_types=d.layer_types or ["full_attention"] * d.num_hidden_layers,
            sliding_window=d.sliding_window, attention_backend=d.attention_backend,
            objective_chunk_blocks=d.objective_chunk_blocks))
    if draft.domino is not None:
        msg.domino.CopyFrom(run_pb2.DominoConfig(**draft.domino.model_dump()))
    return msg


def to_proto(cfg: RunConfigFile, *, num_layers: int, hidden_size: int, vocab_size: int,
             tokenizer_hash: str, aux_layer_ids: list[int], model_path: str | None = None,
             mask_token_id: int | None = None) -> run_pb2.RunConfig:
    """Build the wire config; model facts come from the target directory."""
    return run_pb2.RunConfig(
        target=run_pb2.TargetConfig(
            model_path=model_path or cfg.target.model_path,
            revision=cfg.target.revision,
            num_layers=num_layers,
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            tokenizer_hash=tokenizer_hash,
        ),
        capture=run_pb2.CaptureConfig(
            aux_layer_ids=aux_layer_ids,
            max_length=cfg.capture.max_length,
            chat_template=cfg.capture.chat_template or "",
        ),
        draft=draft_proto(cfg.draft, mask_token_id),
        step=run_pb2.StepGeometry(**cfg.step.model_dump()),
        training=run_pb2.TrainingConfig(**cfg.training.model_dump(exclude={"total_steps"}),
                                        total_steps=cfg.training.total_steps or 0),
        lease=run_pb2.LeaseConfig(**cfg.lease.model_dump()),
        watermark=run_pb2.WatermarkConfig(**cfg.watermark.model_dump()),
        epochs=cfg.epochs,
        retain=(
            run_pb2.RETAIN_POLICY_STEP if cfg.retain == "step" else run_pb2.RETAIN_POLICY_CHECKPOINT
        ),
        dataset_name=Path(cfg.dataset).name,
        regenerate=regenerate_proto(cfg.regenerate),
    )


def regenerate_proto(section: RegenerateSection | None) -> run_pb2.RegenerateConfig | None:
    """The wire ``RegenerateConfig``; None (the field stays unset) when regeneration is off."""
    if section is None:
        return None
    return run_pb2.RegenerateConfig(**section.model_dump())


def default_aux_layers(num_layers: int) -> list[int]:
    """EAGLE3's default capture layers: [1, N//2-1, N-4]."""
    return default_layer_ids("eagle3", num_layers)


def validate_aux_layers(ids: list[int], num_layers: int) -> None:
    """Three distinct ascending ids in [0, N-2] (see ``services.capture``)."""
    try:
        validate_layer_ids(ids, num_layers, "capture.aux_layer_ids", count=3)
    except CapturePlanError as exc:
        raise ConfigError(str(exc)) from None
