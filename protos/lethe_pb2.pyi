import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    FLOAT32: _ClassVar[DataType]
    FLOAT16: _ClassVar[DataType]
    BFLOAT16: _ClassVar[DataType]
    FLOAT64: _ClassVar[DataType]
    UINT8: _ClassVar[DataType]
    INT64: _ClassVar[DataType]

class JobKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_KIND_UNSPECIFIED: _ClassVar[JobKind]
    LEARN: _ClassVar[JobKind]
    UNLEARN: _ClassVar[JobKind]
    COMMIT: _ClassVar[JobKind]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    QUEUED: _ClassVar[JobState]
    RUNNING: _ClassVar[JobState]
    SUCCEEDED: _ClassVar[JobState]
    FAILED: _ClassVar[JobState]
    CANCELLED: _ClassVar[JobState]

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    LEARNING: _ClassVar[TaskState]
    LEARNED: _ClassVar[TaskState]
    TEMPORARY: _ClassVar[TaskState]
    UNLEARNING: _ClassVar[TaskState]
    UNLEARNED: _ClassVar[TaskState]

class ExportFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EXPORT_FORMAT_UNSPECIFIED: _ClassVar[ExportFormat]
    ONNX: _ClassVar[ExportFormat]
    TORCHSCRIPT: _ClassVar[ExportFormat]
    SAFETENSORS: _ClassVar[ExportFormat]
DATA_TYPE_UNSPECIFIED: DataType
FLOAT32: DataType
FLOAT16: DataType
BFLOAT16: DataType
FLOAT64: DataType
UINT8: DataType
INT64: DataType
JOB_KIND_UNSPECIFIED: JobKind
LEARN: JobKind
UNLEARN: JobKind
COMMIT: JobKind
JOB_STATE_UNSPECIFIED: JobState
QUEUED: JobState
RUNNING: JobState
SUCCEEDED: JobState
FAILED: JobState
CANCELLED: JobState
TASK_STATE_UNSPECIFIED: TaskState
LEARNING: TaskState
LEARNED: TaskState
TEMPORARY: TaskState
UNLEARNING: TaskState
UNLEARNED: TaskState
EXPORT_FORMAT_UNSPECIFIED: ExportFormat
ONNX: ExportFormat
TORCHSCRIPT: ExportFormat
SAFETENSORS: ExportFormat

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LearnHeader(_message.Message):
    __slots__ = ("task", "idempotency_key", "mode", "epochs", "batch_size", "learning_rate", "holdout_fraction", "metadata", "ttl_seconds")
    class LearnMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PERMANENT: _ClassVar[LearnHeader.LearnMode]
        TEMPORARY: _ClassVar[LearnHeader.LearnMode]
    PERMANENT: LearnHeader.LearnMode
    TEMPORARY: LearnHeader.LearnMode
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    HOLDOUT_FRACTION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    task: str
    idempotency_key: str
    mode: LearnHeader.LearnMode
    epochs: int
    batch_size: int
    learning_rate: float
    holdout_fraction: float
    metadata: _containers.ScalarMap[str, str]
    ttl_seconds: int
    def __init__(self, task: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., mode: _Optional[_Union[LearnHeader.LearnMode, str]] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., holdout_fraction: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class SampleChunk(_message.Message):
    __slots__ = ("inputs", "labels", "sample_ids")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    inputs: Tensor
    labels: Tensor
    sample_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, inputs: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ..., sample_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class LearnRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: LearnHeader
    chunk: SampleChunk
    def __init__(self, header: _Optional[_Union[LearnHeader, _Mapping]] = ..., chunk: _Optional[_Union[SampleChunk, _Mapping]] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("task", "idempotency_key")
    TASK_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    task: str
    idempotency_key: str
    def __init__(self, task: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class UnlearnRequest(_message.Message):
    __slots__ = ("task", "reason", "idempotency_key", "method", "sample_ids")
    TASK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    task: str
    reason: str
    idempotency_key: str
    method: str
    sample_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task: _Optional[str] = ..., reason: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., method: _Optional[str] = ..., sample_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("task", "inputs", "return_probabilities", "allow_unlearned")
    TASK_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    RETURN_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    ALLOW_UNLEARNED_FIELD_NUMBER: _ClassVar[int]
    task: str
    inputs: Tensor
    return_probabilities: bool
    allow_unlearned: bool
    def __init__(self, task: _Optional[str] = ..., inputs: _Optional[_Union[Tensor, _Mapping]] = ..., return_probabilities: _Optional[bool] = ..., allow_unlearned: _Optional[bool] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("outputs", "classes", "model_version")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    outputs: Tensor
    classes: _containers.RepeatedScalarFieldContainer[int]
    model_version: int
    def __init__(self, outputs: _Optional[_Union[Tensor, _Mapping]] = ..., classes: _Optional[_Iterable[int]] = ..., model_version: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "kind", "state", "task", "progress", "message", "model_version", "created_at", "started_at", "finished_at", "metrics", "seq", "samples", "method", "sample_id_prefix", "sample_ids")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ID_PREFIX_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: JobKind
    state: JobState
    task: str
    progress: float
    message: str
    model_version: int
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    metrics: _containers.ScalarMap[str, float]
    seq: int
    samples: int
    method: str
    sample_id_prefix: str
    sample_ids: int
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[JobKind, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., task: _Optional[str] = ..., progress: _Optional[float] = ..., message: _Optional[str] = ..., model_version: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., seq: _Optional[int] = ..., samples: _Optional[int] = ..., method: _Optional[str] = ..., sample_id_prefix: _Optional[str] = ..., sample_ids: _Optional[int] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("state", "task", "after_seq", "limit")
    STATE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    task: str
    after_seq: int
    limit: int
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., task: _Optional[str] = ..., after_seq: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("name", "state", "samples", "accuracy", "relapse", "learned_version", "unlearned_version", "created_at", "learned_at", "unlearned_at", "classes", "forget_verified", "expires_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    RELAPSE_FIELD_NUMBER: _ClassVar[int]
    LEARNED_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNLEARNED_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LEARNED_AT_FIELD_NUMBER: _ClassVar[int]
    UNLEARNED_AT_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    FORGET_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: TaskState
    samples: int
    accuracy: float
    relapse: float
    learned_version: int
    unlearned_version: int
    created_at: _timestamp_pb2.Timestamp
    learned_at: _timestamp_pb2.Timestamp
    unlearned_at: _timestamp_pb2.Timestamp
    classes: _containers.RepeatedScalarFieldContainer[int]
    forget_verified: bool
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[TaskState, str]] = ..., samples: _Optional[int] = ..., accuracy: _Optional[float] = ..., relapse: _Optional[float] = ..., learned_version: _Optional[int] = ..., unlearned_version: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., learned_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., unlearned_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., classes: _Optional[_Iterable[int]] = ..., forget_verified: _Optional[bool] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: TaskState
    def __init__(self, state: _Optional[_Union[TaskState, str]] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("seq", "at", "principal", "action", "task", "job_id", "details_json", "prev_hash", "hash", "signature")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    at: _timestamp_pb2.Timestamp
    principal: str
    action: str
    task: str
    job_id: str
    details_json: str
    prev_hash: str
    hash: str
    signature: str
    def __init__(self, seq: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., principal: _Optional[str] = ..., action: _Optional[str] = ..., task: _Optional[str] = ..., job_id: _Optional[str] = ..., details_json: _Optional[str] = ..., prev_hash: _Optional[str] = ..., hash: _Optional[str] = ..., signature: _Optional[str] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("after_seq", "limit", "task")
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    after_seq: int
    limit: int
    task: str
    def __init__(self, after_seq: _Optional[int] = ..., limit: _Optional[int] = ..., task: _Optional[str] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("strategy", "backbone", "version", "input_shape", "num_classes", "parameters", "config", "task_incremental", "unlearn_methods", "device")
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    BACKBONE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TASK_INCREMENTAL_FIELD_NUMBER: _ClassVar[int]
    UNLEARN_METHODS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    strategy: str
    backbone: str
    version: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    parameters: int
    config: _containers.ScalarMap[str, str]
    task_incremental: bool
    unlearn_methods: _containers.RepeatedScalarFieldContainer[str]
    device: str
    def __init__(self, strategy: _Optional[str] = ..., backbone: _Optional[str] = ..., version: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., parameters: _Optional[int] = ..., config: _Optional[_Mapping[str, str]] = ..., task_incremental: _Optional[bool] = ..., unlearn_methods: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ...) -> None: ...

class Evaluation(_message.Message):
    __slots__ = ("job_id", "kind", "task", "model_version", "accuracies", "metrics", "job_seq", "at")
    class AccuraciesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACCURACIES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    JOB_SEQ_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kind: JobKind
    task: str
    model_version: int
    accuracies: _containers.ScalarMap[str, float]
    metrics: _containers.ScalarMap[str, float]
    job_seq: int
    at: _timestamp_pb2.Timestamp
    def __init__(self, job_id: _Optional[str] = ..., kind: _Optional[_Union[JobKind, str]] = ..., task: _Optional[str] = ..., model_version: _Optional[int] = ..., accuracies: _Optional[_Mapping[str, float]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., job_seq: _Optional[int] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListEvaluationsRequest(_message.Message):
    __slots__ = ("after_job_seq", "limit")
    AFTER_JOB_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    after_job_seq: int
    limit: int
    def __init__(self, after_job_seq: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListEvaluationsResponse(_message.Message):
    __slots__ = ("evaluations",)
    EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    evaluations: _containers.RepeatedCompositeFieldContainer[Evaluation]
    def __init__(self, evaluations: _Optional[_Iterable[_Union[Evaluation, _Mapping]]] = ...) -> None: ...

class LocateSamplesRequest(_message.Message):
    __slots__ = ("sample_ids",)
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    sample_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sample_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class LocateSamplesResponse(_message.Message):
    __slots__ = ("tasks", "unknown")
    class TasksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    TASKS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.ScalarMap[str, int]
    unknown: int
    def __init__(self, tasks: _Optional[_Mapping[str, int]] = ..., unknown: _Optional[int] = ...) -> None: ...

class GetAuditHeadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuditHead(_message.Message):
    __slots__ = ("seq", "hash", "signature", "public_key")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    seq: int
    hash: str
    signature: str
    public_key: str
    def __init__(self, seq: _Optional[int] = ..., hash: _Optional[str] = ..., signature: _Optional[str] = ..., public_key: _Optional[str] = ...) -> None: ...

class GetForgettingCertificateRequest(_message.Message):
    __slots__ = ("task", "job_id")
    TASK_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    task: str
    job_id: str
    def __init__(self, task: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class ForgettingCertificate(_message.Message):
    __slots__ = ("document", "signature", "public_key")
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    document: bytes
    signature: str
    public_key: str
    def __init__(self, document: _Optional[bytes] = ..., signature: _Optional[str] = ..., public_key: _Optional[str] = ...) -> None: ...

class ExportRequest(_message.Message):
    __slots__ = ("task", "format")
    TASK_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    task: str
    format: ExportFormat
    def __init__(self, task: _Optional[str] = ..., format: _Optional[_Union[ExportFormat, str]] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("data", "model_version", "input_shape", "total_bytes", "sha256")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    model_version: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    total_bytes: int
    sha256: str
    def __init__(self, data: _Optional[bytes] = ..., model_version: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...
