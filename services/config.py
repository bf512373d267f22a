"""The run configuration: a YAML file people write, validated here, sent as ``RunConfig``.

Every field has a docstring; every error says which field is wrong and how to fix it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.api import run_pb2


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class TargetSection(_Section):
    model_path: str
    """Directory of the target model (HF layout) on producer and trainer nodes."""
    revision: str = ""
    """Stable label of the target weights (e.g. a commit hash); part of the fingerprint."""


class CaptureSection(_Section):
    aux_layer_ids: list[int] | None = None
    """Three distinct target layers concatenated into aux_hidden_state; default [1, N//2-1, N-4]."""
    max_length: int = Field(2048, gt=0)
    """Prompts are truncated to this many tokens."""
    chat_template: str | None = None
    """Jinja chat template; default: the tokenizer's own."""


class DraftSection(_Section):
    algorithm: str = "eagle3"
    """Draft strategy in the trainer's registry."""
    draft_vocab_size: int = Field(32000, gt=0)
    """Size of the draft vocabulary; the most frequent loss-masked target tokens."""
    ttt_length: int = Field(7, gt=0)
    """Training-time-test unroll length."""


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


class RunConfigFile(_Section):
    """A run as people write it in YAML."""

    run_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    """Name of the run: letters, digits, '_', '.', '-'; used in store keys."""
    dataset: str
    """JSONL file of ShareGPT-style conversations; relative paths are relative to the config."""
    epochs: int = Field(1, gt=0)
    """Passes over the dataset; each prompt is captured once per epoch."""
    retain: Literal["step", "checkpoint"] = "step"
    """Free a sample's tensors when its step is committed, or when a checkpoint covers it."""
    target: TargetSection
    capture: CaptureSection = CaptureSection()
    draft: DraftSection = DraftSection()
    step: StepSection = StepSection()
    training: TrainingSection = TrainingSection()
    lease: LeaseSection = LeaseSection()
    watermark: WatermarkSection = WatermarkSection()

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


def to_proto(cfg: RunConfigFile, *, num_layers: int, hidden_size: int, vocab_size: int,
             tokenizer_hash: str, aux_layer_ids: list[int], model_path: str | None = None,
             ) -> run_pb2.RunConfig:
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
        draft=run_pb2.DraftConfig(**cfg.draft.model_dump()),
        step=run_pb2.StepGeometry(**cfg.step.model_dump()),
        training=run_pb2.TrainingConfig(**cfg.training.model_dump()),
        lease=run_pb2.LeaseConfig(**cfg.lease.model_dump()),
        watermark=run_pb2.WatermarkConfig(**cfg.watermark.model_dump()),
        epochs=cfg.epochs,
        retain=(
            run_pb2.RETAIN_POLICY_STEP if cfg.retain == "step" else run_pb2.RETAIN_POLICY_CHECKPOINT
        ),
        dataset_name=Path(cfg.dataset).name,
    )


def default_aux_layers(num_layers: int) -> list[int]:
    """EAGLE3's default capture layers: [1, N//2-1, N-4]."""
    return [1, num_layers // 2 - 1, num_layers - 4]


def validate_aux_layers(ids: list[int], num_layers: int) -> None:
    """Three distinct ids in [0, N-2]; the last layer's output is the post-norm hidden state."""
    if len(ids) != 3 or len(set(ids)) != 3:
        raise ConfigError(f"capture.aux_layer_ids must be three distinct layer ids, got {ids}")
    bad = [i for i in ids if i < 0 or i >= num_layers - 1]
    if bad:
        raise ConfigError(
            f"capture.aux_layer_ids {bad} out of range: the target has {num_layers} layers, "
            f"so ids must be in [0, {num_layers - 2}]"
        )
