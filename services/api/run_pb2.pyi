from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RetainPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETAIN_POLICY_UNSPECIFIED: _ClassVar[RetainPolicy]
    RETAIN_POLICY_STEP: _ClassVar[RetainPolicy]
    RETAIN_POLICY_CHECKPOINT: _ClassVar[RetainPolicy]
RETAIN_POLICY_UNSPECIFIED: RetainPolicy
RETAIN_POLICY_STEP: RetainPolicy
RETAIN_POLICY_CHECKPOINT: RetainPolicy

class RunConfig(_message.Message):
    __slots__ = ("target", "capture", "draft", "step", "training", "lease", "watermark", "epochs", "retain", "dataset_name", "regenerate")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    RETAIN_FIELD_NUMBER: _ClassVar[int]
    DATASET_NAME_FIELD_NUMBER: _ClassVar[int]
    REGENERATE_FIELD_NUMBER: _ClassVar[int]
    target: TargetConfig
    capture: CaptureConfig
    draft: DraftConfig
    step: StepGeometry
    training: TrainingConfig
    lease: LeaseConfig
    watermark: WatermarkConfig
    epochs: int
    retain: RetainPolicy
    dataset_name: str
    regenerate: RegenerateConfig
    def __init__(self, target: _Optional[_Union[TargetConfig, _Mapping]] = ..., capture: _Optional[_Union[CaptureConfig, _Mapping]] = ..., draft: _Optional[_Union[DraftConfig, _Mapping]] = ..., step: _Optional[_Union[StepGeometry, _Mapping]] = ..., training: _Optional[_Union[TrainingConfig, _Mapping]] = ..., lease: _Optional[_Union[LeaseConfig, _Mapping]] = ..., watermark: _Optional[_Union[WatermarkConfig, _Mapping]] = ..., epochs: _Optional[int] = ..., retain: _Optional[_Union[RetainPolicy, str]] = ..., dataset_name: _Optional[str] = ..., regenerate: _Optional[_Union[RegenerateConfig, _Mapping]] = ...) -> None: ...

class RegenerateConfig(_message.Message):
    __slots__ = ("mode", "temperature", "top_p", "top_k", "max_new_tokens", "seed", "per_epoch", "on_truncation")
    MODE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ON_TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    mode: str
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    seed: int
    per_epoch: bool
    on_truncation: str
    def __init__(self, mode: _Optional[str] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., per_epoch: _Optional[bool] = ..., on_truncation: _Optional[str] = ...) -> None: ...

class TargetConfig(_message.Message):
    __slots__ = ("model_path", "revision", "num_layers", "hidden_size", "vocab_size", "tokenizer_hash")
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_HASH_FIELD_NUMBER: _ClassVar[int]
    model_path: str
    revision: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    tokenizer_hash: str
    def __init__(self, model_path: _Optional[str] = ..., revision: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., tokenizer_hash: _Optional[str] = ...) -> None: ...

class CaptureConfig(_message.Message):
    __slots__ = ("aux_layer_ids", "max_length", "chat_template")
    AUX_LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    aux_layer_ids: _containers.RepeatedScalarFieldContainer[int]
    max_length: int
    chat_template: str
    def __init__(self, aux_layer_ids: _Optional[_Iterable[int]] = ..., max_length: _Optional[int] = ..., chat_template: _Optional[str] = ...) -> None: ...

class DraftConfig(_message.Message):
    __slots__ = ("algorithm", "draft_vocab_size", "ttt_length", "dflash", "domino")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    DRAFT_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TTT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DFLASH_FIELD_NUMBER: _ClassVar[int]
    DOMINO_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    draft_vocab_size: int
    ttt_length: int
    dflash: DFlashConfig
    domino: DominoConfig
    def __init__(self, algorithm: _Optional[str] = ..., draft_vocab_size: _Optional[int] = ..., ttt_length: _Optional[int] = ..., dflash: _Optional[_Union[DFlashConfig, _Mapping]] = ..., domino: _Optional[_Union[DominoConfig, _Mapping]] = ...) -> None: ...

class DFlashConfig(_message.Message):
    __slots__ = ("num_hidden_layers", "block_size", "num_anchors", "loss_decay_gamma", "mask_token_id", "layer_types", "sliding_window", "attention_backend", "objective_chunk_blocks")
    NUM_HIDDEN_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_ANCHORS_FIELD_NUMBER: _ClassVar[int]
    LOSS_DECAY_GAMMA_FIELD_NUMBER: _ClassVar[int]
    MASK_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_TYPES_FIELD_NUMBER: _ClassVar[int]
    SLIDING_WINDOW_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BACKEND_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_CHUNK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    num_hidden_layers: int
    block_size: int
    num_anchors: int
    loss_decay_gamma: float
    mask_token_id: int
    layer_types: _containers.RepeatedScalarFieldContainer[str]
    sliding_window: int
    attention_backend: str
    objective_chunk_blocks: int
    def __init__(self, num_hidden_layers: _Optional[int] = ..., block_size: _Optional[int] = ..., num_anchors: _Optional[int] = ..., loss_decay_gamma: _Optional[float] = ..., mask_token_id: _Optional[int] = ..., layer_types: _Optional[_Iterable[str]] = ..., sliding_window: _Optional[int] = ..., attention_backend: _Optional[str] = ..., objective_chunk_blocks: _Optional[int] = ...) -> None: ...

class DominoConfig(_message.Message):
    __slots__ = ("emb_dim", "gru_hidden_dim", "shift_label", "pure_draft_prefix_len", "lambda_base_start", "lambda_base_decay_ratio")
    EMB_DIM_FIELD_NUMBER: _ClassVar[int]
    GRU_HIDDEN_DIM_FIELD_NUMBER: _ClassVar[int]
    SHIFT_LABEL_FIELD_NUMBER: _ClassVar[int]
    PURE_DRAFT_PREFIX_LEN_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_BASE_START_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_BASE_DECAY_RATIO_FIELD_NUMBER: _ClassVar[int]
    emb_dim: int
    gru_hidden_dim: int
    shift_label: bool
    pure_draft_prefix_len: int
    lambda_base_start: float
    lambda_base_decay_ratio: float
    def __init__(self, emb_dim: _Optional[int] = ..., gru_hidden_dim: _Optional[int] = ..., shift_label: _Optional[bool] = ..., pure_draft_prefix_len: _Optional[int] = ..., lambda_base_start: _Optional[float] = ..., lambda_base_decay_ratio: _Optional[float] = ...) -> None: ...

class StepGeometry(_message.Message):
    __slots__ = ("world_size", "micro_batch", "accumulation")
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATION_FIELD_NUMBER: _ClassVar[int]
    world_size: int
    micro_batch: int
    accumulation: int
    def __init__(self, world_size: _Optional[int] = ..., micro_batch: _Optional[int] = ..., accumulation: _Optional[int] = ...) -> None: ...

class TrainingConfig(_message.Message):
    __slots__ = ("learning_rate", "warmup_steps", "checkpoint_every", "seed", "max_grad_norm", "total_steps")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    warmup_steps: int
    checkpoint_every: int
    seed: int
    max_grad_norm: float
    total_steps: int
    def __init__(self, learning_rate: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., checkpoint_every: _Optional[int] = ..., seed: _Optional[int] = ..., max_grad_norm: _Optional[float] = ..., total_steps: _Optional[int] = ...) -> None: ...

class LeaseConfig(_message.Message):
    __slots__ = ("lease_seconds", "heartbeat_seconds", "heartbeat_misses", "max_attempts", "max_deliveries")
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_MISSES_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    lease_seconds: float
    heartbeat_seconds: float
    heartbeat_misses: int
    max_attempts: int
    max_deliveries: int
    def __init__(self, lease_seconds: _Optional[float] = ..., heartbeat_seconds: _Optional[float] = ..., heartbeat_misses: _Optional[int] = ..., max_attempts: _Optional[int] = ..., max_deliveries: _Optional[int] = ...) -> None: ...

class WatermarkConfig(_message.Message):
    __slots__ = ("high_samples", "low_samples", "high_bytes", "low_bytes", "retry_after_seconds")
    HIGH_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOW_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    HIGH_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOW_BYTES_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    high_samples: int
    low_samples: int
    high_bytes: int
    low_bytes: int
    retry_after_seconds: float
    def __init__(self, high_samples: _Optional[int] = ..., low_samples: _Optional[int] = ..., high_bytes: _Optional[int] = ..., low_bytes: _Optional[int] = ..., retry_after_seconds: _Optional[float] = ...) -> None: ...

class VocabMap(_message.Message):
    __slots__ = ("d2t", "draft_token_ids", "hash")
    D2T_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    d2t: _containers.RepeatedScalarFieldContainer[int]
    draft_token_ids: _containers.RepeatedScalarFieldContainer[int]
    hash: str
    def __init__(self, d2t: _Optional[_Iterable[int]] = ..., draft_token_ids: _Optional[_Iterable[int]] = ..., hash: _Optional[str] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    def __init__(self, messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...) -> None: ...
