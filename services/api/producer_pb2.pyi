from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ProducerGetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProducerGetStatusResponse(_message.Message):
    __slots__ = ("session_id", "run_id", "engine", "device", "samples_per_second", "tokens_per_second", "in_flight", "samples_committed", "prompts_failed", "engine_busy_fraction", "draining", "turns_generated", "turns_truncated", "samples_dropped_truncated", "tokens_generated", "generate_busy_fraction")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    ENGINE_BUSY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    TURNS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    TURNS_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_DROPPED_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_GENERATED_FIELD_NUMBER: _ClassVar[int]
    GENERATE_BUSY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    run_id: str
    engine: str
    device: str
    samples_per_second: float
    tokens_per_second: float
    in_flight: int
    samples_committed: int
    prompts_failed: int
    engine_busy_fraction: float
    draining: bool
    turns_generated: int
    turns_truncated: int
    samples_dropped_truncated: int
    tokens_generated: int
    generate_busy_fraction: float
    def __init__(self, session_id: _Optional[str] = ..., run_id: _Optional[str] = ..., engine: _Optional[str] = ..., device: _Optional[str] = ..., samples_per_second: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., in_flight: _Optional[int] = ..., samples_committed: _Optional[int] = ..., prompts_failed: _Optional[int] = ..., engine_busy_fraction: _Optional[float] = ..., draining: _Optional[bool] = ..., turns_generated: _Optional[int] = ..., turns_truncated: _Optional[int] = ..., samples_dropped_truncated: _Optional[int] = ..., tokens_generated: _Optional[int] = ..., generate_busy_fraction: _Optional[float] = ...) -> None: ...

class ProducerDrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProducerDrainResponse(_message.Message):
    __slots__ = ("draining",)
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    draining: bool
    def __init__(self, draining: _Optional[bool] = ...) -> None: ...
