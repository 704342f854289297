"""The ``lethe.v1.Lethe`` servicer (``grpc.aio``): proto <-> domain only.

Each method validates its request, calls the job service or the prediction service, and converts
the result. Blocking work (SQL, files) runs on the executor through :func:`run_blocking`; the event
loop only parses, checks and waits. Domain errors become status codes through :class:`CallGuard`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import numpy as np
import torch
from grpc import aio

from protos import lethe_pb2 as pb
from protos import lethe_pb2_grpc as pb_grpc
from protos.tensors import NUMPY_DTYPES, to_tensor
from server import export
from server.engine.protocol import LearnOptions
from server.engine.temporary import FORGET_METHOD
from server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from server.jobs import JobService, LearnStream, LearnSubmission, ServingState, UnlearnSubmission
from server.jobs.proof import ProofService
from server.jobs.records import ForgetSamplesSubmission, SampleRequests
from server.jobs.service import CommitSubmission
from server.rpc import validation as v
from server.rpc.auth import current_principal
from server.rpc.convert import audit_message, evaluation_message, job_message, task_message
from server.rpc.guard import CallGuard, run_blocking
from server.rpc.predicting import PredictService
from server.storage import Job, JobKind, JobState, TaskState
from server.telemetry import Telemetry

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Enum)
R = TypeVar("R")

#: Page size when a list request leaves ``limit`` at 0, and the largest allowed.
DEFAULT_PAGE, MAX_PAGE = 100, 1000
#: Sequence numbers are 32-bit in SQL; a paging cursor beyond that means "after everything".
MAX_SEQ = 2**31 - 1
#: Seconds between WatchJob updates while a job reports progress on every batch.
_WATCH_MIN_INTERVAL = 0.1
#: Seconds after which a watch reads its job again even when nothing was announced.
_WATCH_REFRESH = 5.0
#: Seconds a Learn stream's end waits for a cancellation racing it (see :func:`_ended_early`).
_END_OF_STREAM_GRACE = 0.05
#: Predict inputs smaller than this are decoded on the event loop (a few microseconds); larger ones on the executor.
_DECODE_ON_LOOP_BYTES = 256 * 1024


@dataclass(frozen=True)
class ModelDescription:
    """Static facts about the live model, for GetModel and request validation."""

    strategy: str
    backbone: str
    input_shape: tuple[int, ...]
    num_classes: int
    #: Trainable parameters now (it changes when a strategy grows or shrinks its model).
    parameters: Callable[[], int]
    task_incremental: bool
    supports_temporary: bool
    unlearn_methods: tuple[str, ...]
    device: str
    config: dict[str, str]


@dataclass(frozen=True)
class LearnDefaults:
    """What a Learn header's zero fields become (configuration, then the strategy), and stream limits."""

    options: LearnOptions
    max_stream_bytes: int
    max_stream_samples: int
    max_predict_samples: int
    #: Distinct sample ids one records-level Unlearn may name (``limits.max_forget_samples``).
    max_forget_samples: int = 100_000
    #: Time to live of a TEMPORARY task whose Learn leaves ``ttl_seconds`` at 0 (0: never expires).
    temporary_ttl_seconds: int = 0


class LetheServicer(pb_grpc.LetheServicer):
    """Thin ``grpc.aio`` servicer over :class:`JobService` and :class:`PredictService`."""

    def __init__(
        self,
        jobs: JobService,
        serving: ServingState,
        telemetry: Telemetry,
        model: ModelDescription,
        defaults: LearnDefaults,
        *,
        predictions: PredictService,
        executor: Executor,
        guard: CallGuard,
        proofs: ProofService | None = None,
        records: SampleRequests | None = None,
    ) -> None:
        self.proofs = proofs
        self.jobs = jobs
        self.records = records or SampleRequests(
            jobs, f"strategy {model.strategy!r} cannot forget individual samples; unlearn the whole task", ""
        )
        self.serving = serving
        self.telemetry = telemetry
        self.model = model
        self.defaults = defaults
        self.predictions = predictions
        self.executor = executor
        self.guard = guard
        self.samples = v.SampleLimits(model.input_shape, model.num_classes)

    async def _unary(self, method: str, context: aio.ServicerContext, body: Callable[[], R]) -> R:
        """Run a unary call's whole body (validation, SQL, conversion) on the executor."""
        async with self.guard(method, context):
            return await run_blocking(self.executor, body)
        raise AssertionError("unreachable")  # the guard aborted

    # ------------------------------------------------------------------ Learn
    async def Learn(self, request_iterator: AsyncIterator[pb.LearnRequest], context: aio.ServicerContext) -> pb.Job:
        async with self.guard("Learn", context):
            return await self._learn(request_iterator, context)
        raise AssertionError("unreachable")

    async def _learn(self, requests: AsyncIterator[pb.LearnRequest], context: aio.ServicerContext) -> pb.Job:
        first = await anext(aiter(requests), None)
        if first is None:
            raise InvalidArgumentError("header", "the stream is empty; the first message must carry the header")
        if first.WhichOneof("payload") != "header":
            raise InvalidArgumentError("header", "the first message must carry the header, not a chunk")
        submission = self._submission(first.header)
        existing = await run_blocking(self.executor, self.jobs.check_learn, submission)
        if existing is not None:
            return job_message(existing)
        # Opened on the loop (a file create): no await between it and the try that cleans it up.
        stream = LearnStream(self.jobs, submission)
        received = _Received()
        try:
            index = 0
            async for message in requests:
                index += 1
                await run_blocking(self.executor, self._chunk, stream, index, message, received)
            # A cancelled stream ends the iterator like a complete one; its cancellation follows within
            # a millisecond. Give it time to arrive (as CancelledError, here) before anything is recorded.
            await asyncio.sleep(_END_OF_STREAM_GRACE)
            if stream.samples < 2:
                raise InvalidArgumentError(
                    "chunk", f"the stream must carry at least 2 samples (a probe set is held out), got {stream.samples}"
                )
            principal, handler = current_principal().name, asyncio.current_task()
            job = await run_blocking(
                self.executor, lambda: stream.submit(principal, ended_early=lambda: _ended_early(context, handler))
            )
        except BaseException as exc:
            await run_blocking(self.executor, stream.__exit__, type(exc), exc, exc.__traceback__)
            raise
        await run_blocking(self.executor, stream.__exit__, None, None, None)
        self.telemetry.ingest_bytes.inc(received.wire_bytes)
        self.telemetry.ingest_samples.inc(stream.samples)
        return job_message(job)

    def _chunk(self, stream: LearnStream, index: int, message: pb.LearnRequest, received: _Received) -> None:
        """Validate and spool one message of a Learn stream (on the executor)."""
        payload = message.WhichOneof("payload")
        if payload == "header":
            raise InvalidArgumentError("header", f"message {index} repeats the header; send it only once")
        if payload is None:
            raise InvalidArgumentError(
                "chunk", f"message {index} is empty; every message after the header must carry a chunk"
            )
        chunk = message.chunk
        limit = self.defaults.max_stream_samples
        inputs = v.inputs_tensor(
            chunk.inputs,
            self.samples,
            f"chunk[{index}].inputs",
            max(limit - stream.samples, 0),
            f"limits.max_stream_samples ({limit} per Learn stream, {stream.samples} already received)",
        )
        labels = v.labels_tensor(chunk.labels, len(inputs), self.samples.num_classes, f"chunk[{index}].labels")
        ids = v.sample_ids(list(chunk.sample_ids), len(inputs), f"chunk[{index}].sample_ids")
        # The payload's size on the wire, from the validated shapes (reading a bytes field copies it).
        received.wire_bytes += inputs.size * NUMPY_DTYPES[chunk.inputs.dtype].itemsize + labels.nbytes
        if received.wire_bytes > self.defaults.max_stream_bytes:
            raise ResourceExhaustedError(
                f"chunk: the stream exceeds limits.max_stream_bytes ({self.defaults.max_stream_bytes} bytes)"
            )
        stream.append(inputs, labels, ids, f"chunk[{index}].sample_ids")

    def _submission(self, header: pb.LearnHeader) -> LearnSubmission:
        task = v.task_name(header.task, "header.task")
        key = v.idempotency_key(header.idempotency_key, "header.idempotency_key")
        v.learn_numbers(header)
        temporary = header.mode == pb.LearnHeader.TEMPORARY
        if temporary and not self.model.supports_temporary:
            raise FailedPreconditionError(
                f"header.mode: TEMPORARY learning is not supported by strategy {self.model.strategy!r}"
            )
        if header.ttl_seconds and not temporary:
            raise InvalidArgumentError(
                "header.ttl_seconds", f"applies only to mode TEMPORARY; got {header.ttl_seconds} with mode PERMANENT"
            )
        requested = LearnOptions(
            epochs=header.epochs,
            batch_size=header.batch_size,
            learning_rate=header.learning_rate,
            holdout_fraction=header.holdout_fraction,
            temporary=temporary,
        )
        return LearnSubmission(
            task=task,
            idempotency_key=key,
            options=requested.resolved(self.defaults.options),
            metadata=dict(header.metadata),
            ttl_seconds=int(header.ttl_seconds or self.defaults.temporary_ttl_seconds) if temporary else 0,
        )

    # ----------------------------------------------------------------- Commit
    async def Commit(self, request: pb.CommitRequest, context: aio.ServicerContext) -> pb.Job:
        return await self._unary("Commit", context, lambda: job_message(self._commit(request)))

    def _commit(self, request: pb.CommitRequest) -> Job:
        submission = CommitSubmission(
            task=v.task_name(request.task),
            idempotency_key=v.idempotency_key(request.idempotency_key, "idempotency_key"),
        )
        if not self.model.supports_temporary:
            raise FailedPreconditionError(
                f"task: strategy {self.model.strategy!r} has no temporary learning, so there is nothing to commit",
                reason="TEMPORARY_UNSUPPORTED",
            )
        return self.jobs.submit_commit(submission, current_principal().name)

    # ---------------------------------------------------------------- Unlearn
    async def Unlearn(self, request: pb.UnlearnRequest, context: aio.ServicerContext) -> pb.Job:
        return await self._unary("Unlearn", context, lambda: job_message(self._unlearn(request)))

    def _unlearn(self, request: pb.UnlearnRequest) -> Job:
        method = request.method
        temporary_method = self.model.supports_temporary and method == FORGET_METHOD
        if method and method not in self.model.unlearn_methods and not temporary_method:
            raise InvalidArgumentError(
                "method",
                f"strategy {self.model.strategy!r} supports {', '.join(self.model.unlearn_methods)} "
                f"(empty = {self.model.unlearn_methods[0]}), got {method[:40]!r}",
            )
        if request.sample_ids:
            return self._forget_samples(request)
        submission = UnlearnSubmission(
            task=v.task_name(request.task),
            reason=v.reason(request.reason),
            idempotency_key=v.idempotency_key(request.idempotency_key, "idempotency_key"),
            method=method,
        )
        return self.jobs.submit_unlearn(submission, current_principal().name)

    def _forget_samples(self, request: pb.UnlearnRequest) -> Job:
        submission = ForgetSamplesSubmission(
            sample_ids=v.forget_ids(request.sample_ids, self.defaults.max_forget_samples),
            task=v.task_name(request.task) if request.task else "",
            reason=v.reason(request.reason),
            idempotency_key=v.idempotency_key(request.idempotency_key, "idempotency_key"),
            method=request.method,
        )
        return self.records.submit(submission, current_principal().name)

    async def LocateSamples(
        self, request: pb.LocateSamplesRequest, context: aio.ServicerContext
    ) -> pb.LocateSamplesResponse:
        def body() -> pb.LocateSamplesResponse:
            if not request.sample_ids:
                raise InvalidArgumentError("sample_ids", "name at least one sample id")
            ids = v.forget_ids(request.sample_ids, self.defaults.max_forget_samples)
            located = self.records.locate(ids, current_principal().name)
            return pb.LocateSamplesResponse(tasks=located.tasks, unknown=located.unknown)

        return await self._unary("LocateSamples", context, body)

    # ---------------------------------------------------------------- Predict
    async def Predict(self, request: pb.PredictRequest, context: aio.ServicerContext) -> pb.PredictResponse:
        async with self.guard("Predict", context):
            return await self._predict(request)
        raise AssertionError("unreachable")

    async def PredictStream(
        self, request_iterator: AsyncIterator[pb.PredictRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.PredictResponse]:
        async with self.guard("PredictStream", context):
            async for request in request_iterator:
                yield await self._predict(request)

    async def _predict(self, request: pb.PredictRequest) -> pb.PredictResponse:
        started = time.perf_counter()
        principal = current_principal()
        target = self.predictions.target(request.task, principal, allow_unlearned=request.allow_unlearned)
        inputs = await self._inputs(request.inputs)
        if target.audited_principal is not None:
            audit = functools.partial(self.jobs.audit, task=target.task or "", samples=len(inputs))
            await run_blocking(self.executor, audit, target.audited_principal, "predict.unlearned")
        prediction = await self.predictions.predict(target, inputs)
        logits = prediction.logits
        outputs = torch.softmax(torch.from_numpy(logits), dim=1).numpy() if request.return_probabilities else logits
        response = pb.PredictResponse(
            outputs=to_tensor(np.ascontiguousarray(outputs, dtype=np.float32)),
            classes=prediction.classes.tolist(),
            model_version=prediction.version,
        )
        self.telemetry.predict_latency.observe(time.perf_counter() - started)
        return response

    async def _inputs(self, tensor: pb.Tensor) -> np.ndarray:
        """Decode and check Predict inputs: small ones on the loop, large ones on the executor."""
        limit = self.predictions.max_rows
        label = (
            f"limits.max_predict_samples ({self.defaults.max_predict_samples}) and the response size limit "
            f"(server.max_message_bytes: at most {limit} rows of {self.samples.num_classes} classes)"
        )
        if len(tensor.data) < _DECODE_ON_LOOP_BYTES:
            return v.inputs_tensor(tensor, self.samples, "inputs", limit, label)
        return await run_blocking(self.executor, v.inputs_tensor, tensor, self.samples, "inputs", limit, label)

    # ------------------------------------------------------------------- Jobs
    async def GetJob(self, request: pb.GetJobRequest, context: aio.ServicerContext) -> pb.Job:
        return await self._unary("GetJob", context, lambda: job_message(self.jobs.get_job(v.job_id(request.id))))

    async def WatchJob(self, request: pb.GetJobRequest, context: aio.ServicerContext) -> AsyncIterator[pb.Job]:
        async with self.guard("WatchJob", context):
            job_id = v.job_id(request.id)
            events = self.jobs.events
            last: pb.Job | None = None
            seen, waited = -1, 0.0
            while True:
                counter = events.counter  # read before the job: a change after it is seen next time
                if counter != seen or waited >= _WATCH_REFRESH:
                    seen, waited = counter, 0.0
                    job = await run_blocking(self.executor, self.jobs.get_job, job_id)
                    message = job_message(job)
                    if message != last:
                        yield message
                        last = message
                    if job.state.terminal:
                        return
                if events.closed:
                    raise UnavailableError(
                        "the server is shutting down; watch again after it restarts", reason="SERVER_STOPPING"
                    )
                await asyncio.sleep(_WATCH_MIN_INTERVAL)
                waited += _WATCH_MIN_INTERVAL

    async def CancelJob(self, request: pb.GetJobRequest, context: aio.ServicerContext) -> pb.Job:
        def body() -> pb.Job:
            job_id = v.job_id(request.id)
            principal = current_principal()
            if self.jobs.get_job(job_id).kind == JobKind.UNLEARN and not principal.has("admin"):
                raise PermissionDeniedError("cancelling an unlearn job needs the 'admin' scope")
            return job_message(self.jobs.cancel(job_id, principal.name))

        return await self._unary("CancelJob", context, body)

    async def ListJobs(self, request: pb.ListJobsRequest, context: aio.ServicerContext) -> pb.ListJobsResponse:
        def body() -> pb.ListJobsResponse:
            state = _enum_or_none(JobState, pb.JobState, request.state, "state")
            task = v.task_name(request.task) if request.task else None
            jobs = self.jobs.list_jobs(state, task, _cursor(request.after_seq), _limit(request.limit))
            return pb.ListJobsResponse(jobs=[job_message(j) for j in jobs])

        return await self._unary("ListJobs", context, body)

    # ------------------------------------------------------------------ Tasks
    async def GetTask(self, request: pb.GetTaskRequest, context: aio.ServicerContext) -> pb.Task:
        return await self._unary(
            "GetTask", context, lambda: task_message(self.jobs.get_task(v.task_name(request.name, "name")))
        )

    async def ListTasks(self, request: pb.ListTasksRequest, context: aio.ServicerContext) -> pb.ListTasksResponse:
        def body() -> pb.ListTasksResponse:
            state = _enum_or_none(TaskState, pb.TaskState, request.state, "state")
            return pb.ListTasksResponse(tasks=[task_message(t) for t in self.jobs.list_tasks(state)])

        return await self._unary("ListTasks", context, body)

    # ------------------------------------------------------- Audit, model, evals
    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: aio.ServicerContext
    ) -> pb.ListAuditEventsResponse:
        def body() -> pb.ListAuditEventsResponse:
            task = v.task_name(request.task) if request.task else None
            events = self.jobs.list_audit(_cursor(request.after_seq), _limit(request.limit), task)
            return pb.ListAuditEventsResponse(events=[audit_message(e) for e in events])

        return await self._unary("ListAuditEvents", context, body)

    async def GetAuditHead(self, request: pb.GetAuditHeadRequest, context: aio.ServicerContext) -> pb.AuditHead:
        def body() -> pb.AuditHead:
            proofs = self._proofs()
            head = proofs.audit_head()
            return pb.AuditHead(
                seq=head.seq, hash=head.hash, signature=head.signature, public_key=proofs.key.public_key.pem
            )

        return await self._unary("GetAuditHead", context, body)

    async def GetForgettingCertificate(
        self, request: pb.GetForgettingCertificateRequest, context: aio.ServicerContext
    ) -> pb.ForgettingCertificate:
        def body() -> pb.ForgettingCertificate:
            task = v.task_name(request.task) if request.task else ""
            job_id = v.job_id(request.job_id, "job_id") if request.job_id else ""
            issued = self._proofs().certificate(task=task, job_id=job_id, principal=current_principal().name)
            return pb.ForgettingCertificate(
                document=issued.document, signature=issued.signature, public_key=issued.public_key
            )

        return await self._unary("GetForgettingCertificate", context, body)

    def _proofs(self) -> ProofService:
        if self.proofs is None:
            raise FailedPreconditionError("this server was started without an audit signing key")
        return self.proofs

    async def GetModel(self, request: pb.GetModelRequest, context: aio.ServicerContext) -> pb.ModelInfo:
        def body() -> pb.ModelInfo:
            m = self.model
            predictor = self.serving.predictor
            return pb.ModelInfo(
                strategy=m.strategy,
                backbone=m.backbone,
                version=predictor.version if predictor is not None else 0,
                input_shape=list(m.input_shape),
                num_classes=m.num_classes,
                parameters=m.parameters(),
                config=m.config,
                task_incremental=m.task_incremental,
                unlearn_methods=list(m.unlearn_methods),
                device=m.device,
            )

        return await self._unary("GetModel", context, body)

    async def ListEvaluations(
        self, request: pb.ListEvaluationsRequest, context: aio.ServicerContext
    ) -> pb.ListEvaluationsResponse:
        def body() -> pb.ListEvaluationsResponse:
            rows = self.jobs.list_evaluations(_cursor(request.after_job_seq), _limit(request.limit))
            return pb.ListEvaluationsResponse(evaluations=[evaluation_message(r) for r in rows])

        return await self._unary("ListEvaluations", context, body)

    # ----------------------------------------------------------------- Export
    async def Export(self, request: pb.ExportRequest, context: aio.ServicerContext) -> AsyncIterator[pb.ExportChunk]:
        """The network Predict serves for a task, as a file (admin; audited as ``model.exported``)."""
        async with self.guard("Export", context):
            target = self.predictions.target(request.task, current_principal())  # as Predict: same refusals
            exported = await run_blocking(self.executor, self._export, target.task, request.format)
            for chunk in exported.chunks():
                yield chunk

    def _export(self, task: str | None, requested: int) -> export.ExportedNetwork:
        fmt = export.format_of(requested)
        exported = export.export_network(
            self.predictions.answering_model(task),
            task=task,
            fmt=fmt,
            input_shape=self.model.input_shape,
            strategy=self.model.strategy,
            backbone=self.model.backbone,
        )
        self.jobs.audit(
            current_principal().name,
            "model.exported",
            task=task or "",
            format=fmt,
            model_version=exported.model_version,
            sha256=exported.sha256,
            bytes=len(exported.data),
        )
        return exported


@dataclass
class _Received:
    """What a Learn stream has carried so far."""

    wire_bytes: int = 0


def _ended_early(context: aio.ServicerContext, handler: asyncio.Task[Any] | None) -> bool:
    """Whether the client cancelled the call or its deadline passed (asked from the executor).

    When a client cancels a stream half-way, or its deadline passes, the request iterator ends exactly
    like a complete stream (grpc/grpc#33038); the cancellation reaches the handler's task moments later
    (well under a millisecond on the event loop). Asked after the spool's fsync, this tells the two
    apart, so a truncated stream is never recorded as a job.
    """
    if handler is not None and handler.cancelling():
        return True
    remaining = context.time_remaining()
    return context.done() or context.cancelled() or (remaining is not None and remaining <= 0)


def _cursor(after: int) -> int:
    """A paging cursor (int64 on the wire) within the range of SQL sequence numbers."""
    return min(max(after, 0), MAX_SEQ)


def _limit(requested: int) -> int:
    if requested > MAX_PAGE:
        raise InvalidArgumentError("limit", f"must be 0 (default {DEFAULT_PAGE}) to {MAX_PAGE}, got {requested}")
    return requested or DEFAULT_PAGE


def _enum_or_none(domain: type[E], proto_enum: Any, value: int, field: str) -> E | None:
    """Map a proto enum value to the domain enum; 0 (unspecified) means no filter."""
    if value == 0:
        return None
    try:
        name = proto_enum.Name(value)
    except ValueError:
        raise InvalidArgumentError(field, f"unknown value {value}") from None
    return domain[name]
