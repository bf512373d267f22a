import datetime

from services.api import common_pb2 as _common_pb2
from services.api import run_pb2 as _run_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_ACTIVE: _ClassVar[RunState]
    RUN_STATE_COMPLETED: _ClassVar[RunState]
    RUN_STATE_CANCELLED: _ClassVar[RunState]
    RUN_STATE_CREATING: _ClassVar[RunState]

class CommitStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMIT_STATUS_UNSPECIFIED: _ClassVar[CommitStatus]
    COMMIT_STATUS_ACCEPTED: _ClassVar[CommitStatus]
    COMMIT_STATUS_DUPLICATE: _ClassVar[CommitStatus]
    COMMIT_STATUS_REJECTED: _ClassVar[CommitStatus]

class TailState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TAIL_STATE_UNSPECIFIED: _ClassVar[TailState]
    TAIL_STATE_MORE: _ClassVar[TailState]
    TAIL_STATE_END_OF_DATA: _ClassVar[TailState]
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_ACTIVE: RunState
RUN_STATE_COMPLETED: RunState
RUN_STATE_CANCELLED: RunState
RUN_STATE_CREATING: RunState
COMMIT_STATUS_UNSPECIFIED: CommitStatus
COMMIT_STATUS_ACCEPTED: CommitStatus
COMMIT_STATUS_DUPLICATE: CommitStatus
COMMIT_STATUS_REJECTED: CommitStatus
TAIL_STATE_UNSPECIFIED: TailState
TAIL_STATE_MORE: TailState
TAIL_STATE_END_OF_DATA: TailState

class Run(_message.Message):
    __slots__ = ("run_id", "config", "state", "fingerprint", "vocab_map", "created_at", "num_prompts", "num_bad_rows")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_MAP_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    NUM_BAD_ROWS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config: _run_pb2.RunConfig
    state: RunState
    fingerprint: str
    vocab_map: _run_pb2.VocabMap
    created_at: _timestamp_pb2.Timestamp
    num_prompts: int
    num_bad_rows: int
    def __init__(self, run_id: _Optional[str] = ..., config: _Optional[_Union[_run_pb2.RunConfig, _Mapping]] = ..., state: _Optional[_Union[RunState, str]] = ..., fingerprint: _Optional[str] = ..., vocab_map: _Optional[_Union[_run_pb2.VocabMap, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., num_prompts: _Optional[int] = ..., num_bad_rows: _Optional[int] = ...) -> None: ...

class BadRow(_message.Message):
    __slots__ = ("line", "reason")
    LINE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    line: int
    reason: str
    def __init__(self, line: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class CreateRunRequest(_message.Message):
    __slots__ = ("run_id", "config", "dataset_lines", "vocab_map")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DATASET_LINES_FIELD_NUMBER: _ClassVar[int]
    VOCAB_MAP_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config: _run_pb2.RunConfig
    dataset_lines: _containers.RepeatedScalarFieldContainer[str]
    vocab_map: _run_pb2.VocabMap
    def __init__(self, run_id: _Optional[str] = ..., config: _Optional[_Union[_run_pb2.RunConfig, _Mapping]] = ..., dataset_lines: _Optional[_Iterable[str]] = ..., vocab_map: _Optional[_Union[_run_pb2.VocabMap, _Mapping]] = ...) -> None: ...

class CreateRunResponse(_message.Message):
    __slots__ = ("run", "bad_rows", "duplicate_prompts")
    RUN_FIELD_NUMBER: _ClassVar[int]
    BAD_ROWS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    run: Run
    bad_rows: _containers.RepeatedCompositeFieldContainer[BadRow]
    duplicate_prompts: int
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ..., bad_rows: _Optional[_Iterable[_Union[BadRow, _Mapping]]] = ..., duplicate_prompts: _Optional[int] = ...) -> None: ...

class CreateRunStreamRequest(_message.Message):
    __slots__ = ("run_id", "config", "dataset_lines", "vocab_map")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DATASET_LINES_FIELD_NUMBER: _ClassVar[int]
    VOCAB_MAP_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config: _run_pb2.RunConfig
    dataset_lines: _containers.RepeatedScalarFieldContainer[str]
    vocab_map: _run_pb2.VocabMap
    def __init__(self, run_id: _Optional[str] = ..., config: _Optional[_Union[_run_pb2.RunConfig, _Mapping]] = ..., dataset_lines: _Optional[_Iterable[str]] = ..., vocab_map: _Optional[_Union[_run_pb2.VocabMap, _Mapping]] = ...) -> None: ...

class CreateRunStreamResponse(_message.Message):
    __slots__ = ("run", "bad_rows", "duplicate_prompts")
    RUN_FIELD_NUMBER: _ClassVar[int]
    BAD_ROWS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    run: Run
    bad_rows: _containers.RepeatedCompositeFieldContainer[BadRow]
    duplicate_prompts: int
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ..., bad_rows: _Optional[_Iterable[_Union[BadRow, _Mapping]]] = ..., duplicate_prompts: _Optional[int] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs",)
    RUNS_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ...) -> None: ...

class CancelRunRequest(_message.Message):
    __slots__ = ("run_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("run_id", "role", "fingerprint", "identity", "trainer_group")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    TRAINER_GROUP_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    role: _common_pb2.WorkerRole
    fingerprint: str
    identity: str
    trainer_group: str
    def __init__(self, run_id: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., fingerprint: _Optional[str] = ..., identity: _Optional[str] = ..., trainer_group: _Optional[str] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("session_id", "heartbeat_interval_seconds", "run", "last_committed_step", "last_checkpoint_step", "last_checkpoint_uri")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_URI_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    heartbeat_interval_seconds: float
    run: Run
    last_committed_step: int
    last_checkpoint_step: int
    last_checkpoint_uri: str
    def __init__(self, session_id: _Optional[str] = ..., heartbeat_interval_seconds: _Optional[float] = ..., run: _Optional[_Union[Run, _Mapping]] = ..., last_committed_step: _Optional[int] = ..., last_checkpoint_step: _Optional[int] = ..., last_checkpoint_uri: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("run_active",)
    RUN_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    run_active: bool
    def __init__(self, run_active: _Optional[bool] = ...) -> None: ...

class UnregisterWorkerRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class UnregisterWorkerResponse(_message.Message):
    __slots__ = ("released_leases",)
    RELEASED_LEASES_FIELD_NUMBER: _ClassVar[int]
    released_leases: int
    def __init__(self, released_leases: _Optional[int] = ...) -> None: ...

class PromptLease(_message.Message):
    __slots__ = ("prompt_id", "epoch", "sample_id", "generation", "lease_token", "deadline", "conversation", "attempt", "generated")
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    GENERATED_FIELD_NUMBER: _ClassVar[int]
    prompt_id: str
    epoch: int
    sample_id: str
    generation: int
    lease_token: str
    deadline: _timestamp_pb2.Timestamp
    conversation: _run_pb2.Conversation
    attempt: int
    generated: _containers.RepeatedCompositeFieldContainer[_common_pb2.GeneratedTurn]
    def __init__(self, prompt_id: _Optional[str] = ..., epoch: _Optional[int] = ..., sample_id: _Optional[str] = ..., generation: _Optional[int] = ..., lease_token: _Optional[str] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., conversation: _Optional[_Union[_run_pb2.Conversation, _Mapping]] = ..., attempt: _Optional[int] = ..., generated: _Optional[_Iterable[_Union[_common_pb2.GeneratedTurn, _Mapping]]] = ...) -> None: ...

class LeasePromptsRequest(_message.Message):
    __slots__ = ("session_id", "max_prompts")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_prompts: int
    def __init__(self, session_id: _Optional[str] = ..., max_prompts: _Optional[int] = ...) -> None: ...

class LeasePromptsResponse(_message.Message):
    __slots__ = ("leases", "retry_after_seconds", "exhausted", "run_ended")
    LEASES_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXHAUSTED_FIELD_NUMBER: _ClassVar[int]
    RUN_ENDED_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[PromptLease]
    retry_after_seconds: float
    exhausted: bool
    run_ended: bool
    def __init__(self, leases: _Optional[_Iterable[_Union[PromptLease, _Mapping]]] = ..., retry_after_seconds: _Optional[float] = ..., exhausted: _Optional[bool] = ..., run_ended: _Optional[bool] = ...) -> None: ...

class LeaseHandle(_message.Message):
    __slots__ = ("sample_id", "lease_token")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    lease_token: str
    def __init__(self, sample_id: _Optional[str] = ..., lease_token: _Optional[str] = ...) -> None: ...

class ExtendLeasesRequest(_message.Message):
    __slots__ = ("session_id", "leases")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    leases: _containers.RepeatedCompositeFieldContainer[LeaseHandle]
    def __init__(self, session_id: _Optional[str] = ..., leases: _Optional[_Iterable[_Union[LeaseHandle, _Mapping]]] = ...) -> None: ...

class ExtendLeasesResponse(_message.Message):
    __slots__ = ("deadlines",)
    DEADLINES_FIELD_NUMBER: _ClassVar[int]
    deadlines: _containers.RepeatedCompositeFieldContainer[_timestamp_pb2.Timestamp]
    def __init__(self, deadlines: _Optional[_Iterable[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]]] = ...) -> None: ...

class FailPromptsRequest(_message.Message):
    __slots__ = ("session_id", "leases", "reason", "retryable")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    leases: _containers.RepeatedCompositeFieldContainer[LeaseHandle]
    reason: str
    retryable: bool
    def __init__(self, session_id: _Optional[str] = ..., leases: _Optional[_Iterable[_Union[LeaseHandle, _Mapping]]] = ..., reason: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class FailPromptsResponse(_message.Message):
    __slots__ = ("dead_sample_ids",)
    DEAD_SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    dead_sample_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, dead_sample_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class CommitSamplesRequest(_message.Message):
    __slots__ = ("session_id", "samples")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    samples: _containers.RepeatedCompositeFieldContainer[SampleCommit]
    def __init__(self, session_id: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[SampleCommit, _Mapping]]] = ...) -> None: ...

class SampleCommit(_message.Message):
    __slots__ = ("ref", "lease_token")
    REF_FIELD_NUMBER: _ClassVar[int]
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ref: _common_pb2.SampleRef
    lease_token: str
    def __init__(self, ref: _Optional[_Union[_common_pb2.SampleRef, _Mapping]] = ..., lease_token: _Optional[str] = ...) -> None: ...

class CommitResult(_message.Message):
    __slots__ = ("sample_id", "status", "reason")
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    sample_id: str
    status: CommitStatus
    reason: str
    def __init__(self, sample_id: _Optional[str] = ..., status: _Optional[_Union[CommitStatus, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class CommitSamplesResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[CommitResult]
    def __init__(self, results: _Optional[_Iterable[_Union[CommitResult, _Mapping]]] = ...) -> None: ...

class StreamStepsRequest(_message.Message):
    __slots__ = ("session_id", "rank", "from_step", "prefetch", "resume")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    rank: int
    from_step: int
    prefetch: int
    resume: bool
    def __init__(self, session_id: _Optional[str] = ..., rank: _Optional[int] = ..., from_step: _Optional[int] = ..., prefetch: _Optional[int] = ..., resume: _Optional[bool] = ...) -> None: ...

class StreamStepsResponse(_message.Message):
    __slots__ = ("step", "refs", "end_of_data", "tail", "dropped_samples")
    STEP_FIELD_NUMBER: _ClassVar[int]
    REFS_FIELD_NUMBER: _ClassVar[int]
    END_OF_DATA_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    DROPPED_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    step: int
    refs: _containers.RepeatedCompositeFieldContainer[_common_pb2.SampleRef]
    end_of_data: bool
    tail: TailState
    dropped_samples: int
    def __init__(self, step: _Optional[int] = ..., refs: _Optional[_Iterable[_Union[_common_pb2.SampleRef, _Mapping]]] = ..., end_of_data: _Optional[bool] = ..., tail: _Optional[_Union[TailState, str]] = ..., dropped_samples: _Optional[int] = ...) -> None: ...

class CommitStepRequest(_message.Message):
    __slots__ = ("session_id", "step", "loss", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    loss: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class CommitStepResponse(_message.Message):
    __slots__ = ("retire",)
    RETIRE_FIELD_NUMBER: _ClassVar[int]
    retire: _containers.RepeatedCompositeFieldContainer[_common_pb2.SampleRef]
    def __init__(self, retire: _Optional[_Iterable[_Union[_common_pb2.SampleRef, _Mapping]]] = ...) -> None: ...

class CommitCheckpointRequest(_message.Message):
    __slots__ = ("session_id", "step", "uri")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    uri: str
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., uri: _Optional[str] = ...) -> None: ...

class CommitCheckpointResponse(_message.Message):
    __slots__ = ("retire",)
    RETIRE_FIELD_NUMBER: _ClassVar[int]
    retire: _containers.RepeatedCompositeFieldContainer[_common_pb2.SampleRef]
    def __init__(self, retire: _Optional[_Iterable[_Union[_common_pb2.SampleRef, _Mapping]]] = ...) -> None: ...

class ReportLostRequest(_message.Message):
    __slots__ = ("session_id", "sample_id", "generation", "reason")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sample_id: str
    generation: int
    reason: str
    def __init__(self, session_id: _Optional[str] = ..., sample_id: _Optional[str] = ..., generation: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportLostResponse(_message.Message):
    __slots__ = ("recapture",)
    RECAPTURE_FIELD_NUMBER: _ClassVar[int]
    recapture: bool
    def __init__(self, recapture: _Optional[bool] = ...) -> None: ...

class RetireSamplesRequest(_message.Message):
    __slots__ = ("session_id", "sample_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sample_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., sample_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RetireSamplesResponse(_message.Message):
    __slots__ = ("retired",)
    RETIRED_FIELD_NUMBER: _ClassVar[int]
    retired: int
    def __init__(self, retired: _Optional[int] = ...) -> None: ...

class GetRunStatusRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("session_id", "role", "identity", "last_heartbeat", "active_leases")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_LEASES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    role: _common_pb2.WorkerRole
    identity: str
    last_heartbeat: _timestamp_pb2.Timestamp
    active_leases: int
    def __init__(self, session_id: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., identity: _Optional[str] = ..., last_heartbeat: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active_leases: _Optional[int] = ...) -> None: ...

class RunStatus(_message.Message):
    __slots__ = ("run_id", "state", "prompts", "samples", "workers", "last_committed_step", "last_checkpoint_step", "last_checkpoint_uri", "bytes_in_flight", "samples_committed_per_second", "steps_committed_per_second", "last_step_loss", "total_steps_estimate", "throttled", "fingerprint")
    class PromptsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class SamplesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LAST_COMMITTED_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_URI_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_COMMITTED_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    STEPS_COMMITTED_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_LOSS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: RunState
    prompts: _containers.ScalarMap[str, int]
    samples: _containers.ScalarMap[str, int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    last_committed_step: int
    last_checkpoint_step: int
    last_checkpoint_uri: str
    bytes_in_flight: int
    samples_committed_per_second: float
    steps_committed_per_second: float
    last_step_loss: float
    total_steps_estimate: int
    throttled: bool
    fingerprint: str
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ..., prompts: _Optional[_Mapping[str, int]] = ..., samples: _Optional[_Mapping[str, int]] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., last_committed_step: _Optional[int] = ..., last_checkpoint_step: _Optional[int] = ..., last_checkpoint_uri: _Optional[str] = ..., bytes_in_flight: _Optional[int] = ..., samples_committed_per_second: _Optional[float] = ..., steps_committed_per_second: _Optional[float] = ..., last_step_loss: _Optional[float] = ..., total_steps_estimate: _Optional[int] = ..., throttled: _Optional[bool] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class GetRunStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: RunStatus
    def __init__(self, status: _Optional[_Union[RunStatus, _Mapping]] = ...) -> None: ...

class WatchRunStatusRequest(_message.Message):
    __slots__ = ("run_id", "interval_seconds")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    interval_seconds: float
    def __init__(self, run_id: _Optional[str] = ..., interval_seconds: _Optional[float] = ...) -> None: ...

class WatchRunStatusResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: RunStatus
    def __init__(self, status: _Optional[_Union[RunStatus, _Mapping]] = ...) -> None: ...

class GetRunHistoryRequest(_message.Message):
    __slots__ = ("run_id", "from_step", "to_step", "metric_names", "page_size", "page_token")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    TO_STEP_FIELD_NUMBER: _ClassVar[int]
    METRIC_NAMES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    from_step: int
    to_step: int
    metric_names: _containers.RepeatedScalarFieldContainer[str]
    page_size: int
    page_token: str
    def __init__(self, run_id: _Optional[str] = ..., from_step: _Optional[int] = ..., to_step: _Optional[int] = ..., metric_names: _Optional[_Iterable[str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class StepRecord(_message.Message):
    __slots__ = ("step", "committed_at", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    step: int
    committed_at: _timestamp_pb2.Timestamp
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., committed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GetRunHistoryResponse(_message.Message):
    __slots__ = ("records", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[StepRecord]
    next_page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[StepRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
