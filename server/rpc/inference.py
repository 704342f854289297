"""The Open Inference Protocol (KServe v2 gRPC): ``inference.GRPCInferenceService`` on Lethe's port.

Clients of KServe, Triton and most inference gateways (``tritonclient``) call Lethe through it. The
mapping (DESIGN.md §9):

- model name = the task's name (task-incremental strategies) or ``lethe`` (class-incremental ones);
- model version = the model version (the counter every learn and unlearn bumps); only the current
  version is served, an empty version means the current one;
- one input ``input``: FP32 or UINT8 (scaled to [0, 1], as Lethe's Predict does), shape
  ``[n, *input_shape]``, in ``raw_input_contents[0]`` (little-endian, row-major) or in the typed
  contents (``fp32_contents`` / ``uint_contents``);
- outputs ``logits`` (FP32 ``[n, C]``) and ``classes`` (INT64 ``[n]``), answered in
  ``raw_output_contents`` when the request sent raw input (what tritonclient reads) and in the typed
  contents otherwise.

The input is checked by the same validator as Predict's (:func:`server.rpc.validation.inputs_tensor`)
and predictions go through the same :class:`PredictService` (target checks, dynamic batching). Tasks
that are unlearned or being forgotten are never answered here: this protocol has no ``allow_unlearned``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc import aio

from protos import inference as oip
from protos import lethe_pb2 as pb
from server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from server.rpc.auth import current_principal
from server.rpc.guard import CallGuard
from server.rpc.predicting import PredictService, Target
from server.rpc.validation import inputs_tensor
from server.storage import TaskState

#: The one model of a class-incremental server.
MODEL_NAME = "lethe"
INPUT = "input"
LOGITS = "logits"
CLASSES = "classes"
OUTPUTS = (LOGITS, CLASSES)
PLATFORM = "pytorch"
#: None of Triton's protocol extensions (shared memory, classification, sequences, model repository,
#: statistics, ...) is served. Raw tensor contents are part of the core gRPC protocol.
EXTENSIONS: tuple[str, ...] = ()

#: Input datatype -> (Lethe wire dtype, the typed-contents field that carries it, its numpy dtype).
_INPUT_TYPES: dict[str, tuple[pb.DataType, str, np.dtype]] = {
    "FP32": (pb.FLOAT32, "fp32_contents", np.dtype("<f4")),
    "UINT8": (pb.UINT8, "uint_contents", np.dtype("u1")),
}
#: Parameters whose meaning this server cannot honour: refused rather than silently ignored.
#: Other parameters (``priority``, ``timeout``, custom ones) are accepted and ignored.
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_REFUSED_REQUEST_PARAMETERS = {
    "sequence_id": "sequences (stateful models) are not supported",
    "sequence_start": "sequences (stateful models) are not supported",
    "sequence_end": "sequences (stateful models) are not supported",
}
_REFUSED_OUTPUT_PARAMETERS = {
    "classification": f"the classification extension is not supported; request {CLASSES!r}",
    **dict.fromkeys(_SHARED_MEMORY, "shared memory is not supported"),
}
#: Models listed in a NOT_FOUND message, at most.
_LISTED_MODELS = 20


@dataclass(frozen=True)
class _Input:
    """A decoded, validated input: float32 ``[n, *input_shape]`` and whether it came as raw bytes."""

    array: np.ndarray
    raw: bool


class InferenceServicer:
    """The ``inference.GRPCInferenceService`` methods, over Lethe's prediction service.

    Args:
        predictions: target checks and batched forward passes (shared with Lethe's Predict).
        guard: counts each call and maps domain errors to status codes.
        server_name: ``ServerMetadata.name``.
        server_version: ``ServerMetadata.version`` (Lethe's version).
        extensions: ``ServerMetadata.extensions``.
    """

    def __init__(
        self,
        predictions: PredictService,
        guard: CallGuard,
        *,
        server_name: str = "lethe",
        server_version: str = "",
        extensions: tuple[str, ...] = EXTENSIONS,
    ) -> None:
        self.predictions = predictions
        self.guard = guard
        self.server_name = server_name
        self.server_version = server_version
        self.extensions = extensions

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to register on a ``grpc.aio`` server (the service has no generated stub)."""
        methods: Mapping[str, Callable[[Any, aio.ServicerContext], Awaitable[Any]]] = {
            "ServerLive": self.ServerLive,
            "ServerReady": self.ServerReady,
            "ModelReady": self.ModelReady,
            "ServerMetadata": self.ServerMetadata,
            "ModelMetadata": self.ModelMetadata,
            "ModelInfer": self.ModelInfer,
        }
        return grpc.method_handlers_generic_handler(
            oip.SERVICE_NAME,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    methods[name],
                    request_deserializer=request.FromString,
                    response_serializer=response.SerializeToString,
                )
                for name, (request, response) in oip.METHODS.items()
            },
        )

    # ------------------------------------------------------------------ server
    async def ServerLive(self, request: Any, context: aio.ServicerContext) -> Any:
        """Always live while the process answers (liveness, not readiness)."""
        async with self.guard("ServerLive", context):
            return oip.ServerLiveResponse(live=True)
        raise AssertionError("unreachable")  # the guard aborts on errors

    async def ServerReady(self, request: Any, context: aio.ServicerContext) -> Any:
        """Ready exactly when ``lethe.v1.Lethe`` is (model loaded, recovery done, not stopping)."""
        async with self.guard("ServerReady", context):
            return oip.ServerReadyResponse(ready=bool(self.predictions.ready()))
        raise AssertionError("unreachable")

    async def ServerMetadata(self, request: Any, context: aio.ServicerContext) -> Any:
        """Name, version and protocol extensions of the server."""
        async with self.guard("ServerMetadata", context):
            return oip.ServerMetadataResponse(
                name=self.server_name, version=self.server_version, extensions=list(self.extensions)
            )
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ models
    async def ModelReady(self, request: Any, context: aio.ServicerContext) -> Any:
        """Whether the model (at that version) answers now.

        As Triton does, a model or version that does not exist is not ready (no error), so a client
        can wait for a task that is still being learned. A malformed version is INVALID_ARGUMENT.
        """
        async with self.guard("ModelReady", context):
            version = _version(request.version, "version")
            try:
                self._target(request.name, version, "name", "version")
            except (NotFoundError, FailedPreconditionError, UnavailableError, InvalidArgumentError):
                return oip.ModelReadyResponse(ready=False)
            return oip.ModelReadyResponse(ready=bool(self.predictions.ready()))
        raise AssertionError("unreachable")

    async def ModelMetadata(self, request: Any, context: aio.ServicerContext) -> Any:
        """Platform, the served version, and the input and output tensors of a servable model."""
        async with self.guard("ModelMetadata", context):
            self._target(request.name, _version(request.version, "version"), "name", "version")
            limits = self.predictions.samples
            tensor = oip.ModelMetadataResponse.TensorMetadata
            return oip.ModelMetadataResponse(
                name=request.name,
                versions=[str(self.predictions.version())],
                platform=PLATFORM,
                inputs=[tensor(name=INPUT, datatype="FP32", shape=[-1, *limits.input_shape])],
                outputs=[
                    tensor(name=LOGITS, datatype="FP32", shape=[-1, limits.num_classes]),
                    tensor(name=CLASSES, datatype="INT64", shape=[-1]),
                ],
            )
        raise AssertionError("unreachable")

    async def ModelInfer(self, request: Any, context: aio.ServicerContext) -> Any:
        """Logits and classes of the input rows, from the current model version."""
        async with self.guard("ModelInfer", context):
            started = time.perf_counter()
            version = _version(request.model_version, "model_version")
            target = self._target(request.model_name, version, "model_name", "model_version")
            _check_parameters(request.parameters, "parameters", _REFUSED_REQUEST_PARAMETERS)
            outputs = _requested_outputs(request.outputs)
            decoded = self._input(request)
            prediction = await self.predictions.predict(target, decoded.array)
            if version is not None and prediction.version != version:
                # A learn or unlearn published a new model while the request waited for its batch.
                raise NotFoundError(
                    f"model {request.model_name!r} version {version} is no longer served: version "
                    f"{prediction.version} replaced it; send model_version {prediction.version} or leave it empty"
                )
            values = {LOGITS: prediction.logits, CLASSES: prediction.classes}
            response = oip.ModelInferResponse(
                model_name=request.model_name, model_version=str(prediction.version), id=request.id
            )
            for name in outputs:
                array = values[name]
                output = response.outputs.add(
                    name=name, datatype="FP32" if name == LOGITS else "INT64", shape=list(array.shape)
                )
                if decoded.raw:
                    response.raw_output_contents.append(array.astype("<f4" if name == LOGITS else "<i8").tobytes())
                elif name == LOGITS:
                    output.contents.fp32_contents.extend(array.ravel().tolist())
                else:
                    output.contents.int64_contents.extend(array.tolist())
            self.guard.telemetry.predict_latency.observe(time.perf_counter() - started)
            return response
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ checks
    def _target(self, name: str, version: int | None, name_field: str, version_field: str) -> Target:
        """The prediction target of a model name and version (raises the error a client should see)."""
        predictions = self.predictions
        if not predictions.task_incremental:
            if not name:
                raise InvalidArgumentError(name_field, f"is required: this server serves one model, {MODEL_NAME!r}")
            if name != MODEL_NAME:
                raise NotFoundError(
                    f"model {name[:128]!r} does not exist: strategy {predictions.strategy!r} is class-incremental "
                    f"and this server serves one model, {MODEL_NAME!r}"
                )
            target = predictions.target("", current_principal(), field=name_field)
        else:
            if not name:
                raise InvalidArgumentError(name_field, f"is required: a task's name ({self._models()})")
            state = predictions.serving.task_state(name)
            if state is None:
                raise NotFoundError(f"model {name[:128]!r} does not exist ({self._models()})")
            if state in (TaskState.UNLEARNING, TaskState.UNLEARNED):
                raise FailedPreconditionError(
                    f"model {name!r}: the task is {state.value}; the Open Inference Protocol never answers for it"
                )
            target = predictions.target(name, current_principal(), field=name_field)
        current = predictions.version()
        if version is not None and version != current:
            raise NotFoundError(
                f"model {name!r} version {version} is not served: only the current version ({current}) is; "
                f"send {version_field} {current} or leave it empty"
            )
        return target

    def _models(self) -> str:
        """The models that answer now, for messages."""
        tasks = self.predictions.servable_tasks()
        if not tasks:
            return "no task is learned yet"
        listed = ", ".join(repr(t) for t in tasks[:_LISTED_MODELS])
        more = f" and {len(tasks) - _LISTED_MODELS} more" if len(tasks) > _LISTED_MODELS else ""
        return f"models: {listed}{more}"

    def _input(self, request: Any) -> _Input:
        """Decode and validate the one input tensor with Predict's validator; field paths name the OIP fields."""
        if len(request.inputs) != 1:
            raise InvalidArgumentError("inputs", f"must hold exactly one tensor, {INPUT!r}, got {len(request.inputs)}")
        tensor = request.inputs[0]
        if tensor.name != INPUT:
            raise InvalidArgumentError("inputs[0].name", f"must be {INPUT!r}, got {tensor.name[:64]!r}")
        if tensor.datatype not in _INPUT_TYPES:
            raise InvalidArgumentError(
                "inputs[0].datatype", f"must be FP32 or UINT8 (scaled to [0, 1]), got {tensor.datatype[:32]!r}"
            )
        _check_parameters(
            tensor.parameters,
            "inputs[0].parameters",
            dict.fromkeys(_SHARED_MEMORY, "shared memory is not supported; send the data in raw_input_contents"),
        )
        wire, contents_field, dtype = _INPUT_TYPES[tensor.datatype]
        raw = len(request.raw_input_contents) > 0
        typed = tensor.HasField("contents") and any(True for _ in tensor.contents.ListFields())
        if len(request.raw_input_contents) > 1:
            raise InvalidArgumentError(
                "raw_input_contents", f"must hold one entry (for inputs[0]), got {len(request.raw_input_contents)}"
            )
        if raw and typed:
            raise InvalidArgumentError(
                "inputs[0].contents", "must be empty when raw_input_contents carries the data: send one of them"
            )
        if not raw and not typed:
            raise InvalidArgumentError(
                "inputs[0].contents",
                f"carries no data and raw_input_contents is empty: send the data in one of them "
                f"(inputs[0].contents.{contents_field} or raw_input_contents[0])",
            )
        if raw:
            data_field = "raw_input_contents[0]"
            data = request.raw_input_contents[0]
        else:
            data_field = f"inputs[0].contents.{contents_field}"
            data = _typed_bytes(tensor.contents, tensor.datatype, contents_field, dtype)
        shape = [int(d) for d in tensor.shape]
        predictions = self.predictions
        try:
            array = _validated(pb.Tensor(dtype=wire, shape=shape, data=data), predictions)
        except InvalidArgumentError as exc:
            if exc.field == "inputs[0].shape":
                raise
            # Predict's validator names the data of a lethe Tensor; here it is raw bytes or typed values.
            if exc.field == "inputs[0]":  # the shape is valid: the length of the data disagrees with it
                needed = math.prod(shape)
                if raw:
                    message = (
                        f"has {len(data)} bytes but shape {shape} of {tensor.datatype} needs {needed * dtype.itemsize} "
                        "(row-major, little-endian)"
                    )
                else:
                    message = f"has {len(data) // dtype.itemsize} values but shape {shape} needs {needed}"
            else:
                message = str(exc).removeprefix(f"{exc.field}: ")
            raise InvalidArgumentError(data_field, message) from None
        return _Input(array, raw)


def _validated(tensor: pb.Tensor, predictions: PredictService) -> np.ndarray:
    """Predict's checks and conversion (float32, UINT8 scaled to [0, 1], finite, at most ``max_rows`` rows)."""
    return inputs_tensor(
        tensor,
        predictions.samples,
        "inputs[0]",
        predictions.max_rows,
        limit=f"the rows one request may carry ({predictions.max_rows}: limits.max_predict_samples and the "
        "response size allowed by server.max_message_bytes)",
    )


def _version(value: str, field: str) -> int | None:
    """A requested model version: None for empty (the current one), else a non-negative integer."""
    if not value:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        raise InvalidArgumentError(
            field, f"must be empty (the current version) or a version number, got {value[:32]!r}"
        )
    return int(value)


def _check_parameters(parameters: Mapping[str, Any], field: str, refused: Mapping[str, str]) -> None:
    """Refuse parameters whose meaning this server cannot honour; ignore the others."""
    for key in parameters:
        if key in refused:
            raise InvalidArgumentError(f"{field}.{key}", refused[key])


def _requested_outputs(requested: Any) -> tuple[str, ...]:
    """The output names to answer, in the requested order (both when none is requested)."""
    if not requested:
        return OUTPUTS
    names: list[str] = []
    for index, output in enumerate(requested):
        if output.name not in OUTPUTS:
            raise InvalidArgumentError(
                f"outputs[{index}].name", f"must be {LOGITS!r} or {CLASSES!r}, got {output.name[:64]!r}"
            )
        if output.name in names:
            raise InvalidArgumentError(f"outputs[{index}].name", f"{output.name!r} is requested twice")
        _check_parameters(output.parameters, f"outputs[{index}].parameters", _REFUSED_OUTPUT_PARAMETERS)
        names.append(output.name)
    return tuple(names)


def _typed_bytes(contents: Any, datatype: str, field: str, dtype: np.dtype) -> bytes:
    """The little-endian bytes of typed contents; only the field of the declared datatype may be set."""
    for descriptor, _values in contents.ListFields():
        if descriptor.name != field:
            raise InvalidArgumentError(
                f"inputs[0].contents.{descriptor.name}", f"must be empty: {datatype} data goes in {field}"
            )
    values = getattr(contents, field)
    if dtype == np.uint8:
        wide = np.fromiter(values, dtype=np.uint32, count=len(values))
        if wide.size and int(wide.max()) > 255:
            raise InvalidArgumentError(f"inputs[0].contents.{field}", "UINT8 values must be 0-255")
        return wide.astype(np.uint8).tobytes()
    return np.fromiter(values, dtype=dtype, count=len(values)).tobytes()
