from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class TrainerGetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainerGetStatusResponse(_message.Message):
    __slots__ = ("session_id", "run_id", "step", "loss", "accuracies", "samples_per_second", "data_wait_fraction", "simulated_acceptance_length", "world_size", "device", "majority_accuracy", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACIES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DATA_WAIT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_ACCEPTANCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    run_id: str
    step: int
    loss: float
    accuracies: _containers.RepeatedScalarFieldContainer[float]
    samples_per_second: float
    data_wait_fraction: float
    simulated_acceptance_length: float
    world_size: int
    device: str
    majority_accuracy: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, session_id: _Optional[str] = ..., run_id: _Optional[str] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., accuracies: _Optional[_Iterable[float]] = ..., samples_per_second: _Optional[float] = ..., data_wait_fraction: _Optional[float] = ..., simulated_acceptance_length: _Optional[float] = ..., world_size: _Optional[int] = ..., device: _Optional[str] = ..., majority_accuracy: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("step", "uri")
    STEP_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    step: int
    uri: str
    def __init__(self, step: _Optional[int] = ..., uri: _Optional[str] = ...) -> None: ...
