from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_PRODUCER: _ClassVar[WorkerRole]
    WORKER_ROLE_TRAINER: _ClassVar[WorkerRole]
DTYPE_UNSPECIFIED: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT16: DType
DTYPE_FLOAT32: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_BOOL: DType
DTYPE_UINT8: DType
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_PRODUCER: WorkerRole
WORKER_ROLE_TRAINER: WorkerRole

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes", "key", "checksum")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    key: str
    checksum: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ..., key: _Optional[str] = ..., checksum: _Optional[int] = ...) -> None: ...

class SampleRef(_message.Message):
    __slots__ = ("run_id", "sample_id", "prompt_id", "epoch", "generation", "store", "tensors", "num_tokens", "producer_id", "meta", "capture", "generated")
    class MetaEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_ID_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    CAPTURE_FIELD_NUMBER: _ClassVar[int]
    GENERATED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    sample_id: str
    prompt_id: str
    epoch: int
    generation: int
    store: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    num_tokens: int
    producer_id: str
    meta: _containers.ScalarMap[str, str]
    capture: CapturePlan
    generated: _containers.RepeatedCompositeFieldContainer[GeneratedTurn]
    def __init__(self, run_id: _Optional[str] = ..., sample_id: _Optional[str] = ..., prompt_id: _Optional[str] = ..., epoch: _Optional[int] = ..., generation: _Optional[int] = ..., store: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., num_tokens: _Optional[int] = ..., producer_id: _Optional[str] = ..., meta: _Optional[_Mapping[str, str]] = ..., capture: _Optional[_Union[CapturePlan, _Mapping]] = ..., generated: _Optional[_Iterable[_Union[GeneratedTurn, _Mapping]]] = ...) -> None: ...

class GeneratedTurn(_message.Message):
    __slots__ = ("token_ids", "truncated")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    truncated: bool
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class CapturePlan(_message.Message):
    __slots__ = ("layer_ids", "layers_tensor", "final_hidden")
    LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_TENSOR_FIELD_NUMBER: _ClassVar[int]
    FINAL_HIDDEN_FIELD_NUMBER: _ClassVar[int]
    layer_ids: _containers.RepeatedScalarFieldContainer[int]
    layers_tensor: str
    final_hidden: bool
    def __init__(self, layer_ids: _Optional[_Iterable[int]] = ..., layers_tensor: _Optional[str] = ..., final_hidden: _Optional[bool] = ...) -> None: ...
