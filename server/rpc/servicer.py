"""The ``lethe.v1.Lethe`` servicer: proto <-> domain only.

Each method validates its request, calls the job service or the published model snapshot, and
converts the result. Domain errors become status codes through :mod:`server.rpc.errors`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import grpc
import numpy as np
import torch

from protos import lethe_pb2 as pb
from protos import lethe_pb2_grpc as pb_grpc
from protos.tensors import NUMPY_DTYPES, to_tensor
from server.engine.protocol import LearnOptions, UnknownTaskError, UnlearnedTaskError
from server.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from server.jobs import JobService, LearnStream, LearnSubmission, ServingState, UnlearnSubmission
from server.jobs.proof import ProofService
from server.jobs.records import ForgetSamplesSubmission, SampleRequests
from server.logs import log_context
from server.rpc import validation as v
from server.rpc.auth import current_principal
from server.rpc.convert import audit_message, evaluation_message, job_message, task_message
from server.rpc.errors import rich_status
from server.storage import Job, JobKind, JobState, TaskState
from server.telemetry import Telemetry

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Enum)

#: Page size when a list request leaves ``limit`` at 0, and the largest allowed.
DEFAULT_PAGE, MAX_PAGE = 100, 1000
#: Sequence numbers are 32-bit in SQL; a paging cursor beyond that means "after everything".
MAX_SEQ = 2**31 - 1
#: Seconds between WatchJob updates while a job reports progress on every batch.
_WATCH_MIN_INTERVAL = 0.1


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


class LetheServicer(pb_grpc.LetheServicer):
    """Thin gRPC servicer over :class:`JobService` and :class:`ServingState`."""

    def __init__(
        self,
        jobs: JobService,
        serving: ServingState,
        telemetry: Telemetry,
        model: ModelDescription,
        defaults: LearnDefaults,
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
        self.samples = v.SampleLimits(model.input_shape, model.num_classes)

    @contextmanager
    def _call(self, method: str, context: grpc.ServicerContext) -> Iterator[None]:
        """Count the call and turn domain errors into status codes (never an unhandled exception)."""
        code = "OK"
        try:
            with log_context(principal=current_principal().name):
                yield
        except grpc.RpcError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            status = rich_status(exc)
            code = status.code.name
            if status.code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method)
            context.abort_with_status(status.grpc_status())
        finally:
            self.telemetry.grpc_requests.labels(method, code).inc()

    # ------------------------------------------------------------------ Learn
    def Learn(self, request_iterator: Iterator[pb.LearnRequest], context: grpc.ServicerContext) -> pb.Job:
        with self._call("Learn", context):
            return self._learn(request_iterator, context)
        raise AssertionError("unreachable")  # context.abort raised

    def _learn(self, requests: Iterator[pb.LearnRequest], context: grpc.ServicerContext) -> pb.Job:
        first = next(requests, None)
        if first is None:
            raise InvalidArgumentError("header", "the stream is empty; the first message must carry the header")
        if first.WhichOneof("payload") != "header":
            raise InvalidArgumentError("header", "the first message must carry the header, not a chunk")
        submission = self._submission(first.header)
        existing = self.jobs.check_learn(submission)
        if existing is not None:
            return job_message(existing)
        wire_bytes = 0
        with LearnStream(self.jobs, submission) as stream:
            for index, message in enumerate(requests, start=1):
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
                wire_bytes += inputs.size * NUMPY_DTYPES[chunk.inputs.dtype].itemsize + labels.nbytes
                if wire_bytes > self.defaults.max_stream_bytes:
                    raise ResourceExhaustedError(
                        f"chunk: the stream exceeds limits.max_stream_bytes ({self.defaults.max_stream_bytes} bytes)"
                    )
                stream.append(inputs, labels, ids, f"chunk[{index}].sample_ids")
            if stream.samples < 2:
                raise InvalidArgumentError(
                    "chunk", f"the stream must carry at least 2 samples (a probe set is held out), got {stream.samples}"
                )
            job = stream.submit(current_principal().name, ended_early=lambda: _ended_early(context))
        self.telemetry.ingest_bytes.inc(wire_bytes)
        self.telemetry.ingest_samples.inc(stream.samples)
        return job_message(job)

    def _submission(self, header: pb.LearnHeader) -> LearnSubmission:
        task = v.task_name(header.task, "header.task")
        key = v.idempotency_key(header.idempotency_key, "header.idempotency_key")
        v.learn_numbers(header)
        temporary = header.mode == pb.LearnHeader.TEMPORARY
        if temporary and not self.model.supports_temporary:
            raise FailedPreconditionError(
                f"header.mode: TEMPORARY learning is not supported by strategy {self.model.strategy!r}"
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
        )

    # ---------------------------------------------------------------- Unlearn
    def Unlearn(self, request: pb.UnlearnRequest, context: grpc.ServicerContext) -> pb.Job:
        with self._call("Unlearn", context):
            method = request.method
            if method and method not in self.model.unlearn_methods:
                raise InvalidArgumentError(
                    "method",
                    f"strategy {self.model.strategy!r} supports {', '.join(self.model.unlearn_methods)} "
                    f"(empty = {self.model.unlearn_methods[0]}), got {method[:40]!r}",
                )
            if request.sample_ids:
                return job_message(self._forget_samples(request))
            task = v.task_name(request.task)
            submission = UnlearnSubmission(
                task=task,
                reason=v.reason(request.reason),
                idempotency_key=v.idempotency_key(request.idempotency_key, "idempotency_key"),
                method=method,
            )
            return job_message(self.jobs.submit_unlearn(submission, current_principal().name))
        raise AssertionError("unreachable")

    def _forget_samples(self, request: pb.UnlearnRequest) -> Job:
        submission = ForgetSamplesSubmission(
            sample_ids=v.forget_ids(request.sample_ids, self.defaults.max_forget_samples),
            task=v.task_name(request.task) if request.task else "",
            reason=v.reason(request.reason),
            idempotency_key=v.idempotency_key(request.idempotency_key, "idempotency_key"),
            method=request.method,
        )
        return self.records.submit(submission, current_principal().name)

    def LocateSamples(
        self, request: pb.LocateSamplesRequest, context: grpc.ServicerContext
    ) -> pb.LocateSamplesResponse:
        with self._call("LocateSamples", context):
            if not request.sample_ids:
                raise InvalidArgumentError("sample_ids", "name at least one sample id")
            ids = v.forget_ids(request.sample_ids, self.defaults.max_forget_samples)
            located = self.records.locate(ids, current_principal().name)
            return pb.LocateSamplesResponse(tasks=located.tasks, unknown=located.unknown)
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- Predict
    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        with self._call("Predict", context):
            return self._predict(request)
        raise AssertionError("unreachable")

    def PredictStream(
        self, request_iterator: Iterator[pb.PredictRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.PredictResponse]:
        with self._call("PredictStream", context):
            for request in request_iterator:
                yield self._predict(request)

    def _predict(self, request: pb.PredictRequest) -> pb.PredictResponse:
        started = time.perf_counter()
        answering = self.serving.answering()
        predictor = answering.predictor
        if predictor is None and answering.forgetting:
            jobs = ", ".join(sorted(set(answering.forgetting.values())))
            raise UnavailableError(
                f"an accepted unlearn (job {jobs}) is being applied and no model free of the data it forgets is "
                "kept; predictions resume when it ends"
            )
        if predictor is None:
            raise UnavailableError("the model is still loading; retry shortly")
        task: str | None = None
        audit_as: str | None = None  # who evaluates an unlearned task; audited once the request is valid
        if self.model.task_incremental:
            task = v.task_name(request.task)
            state = self.serving.task_state(task)
            if state is None:
                raise NotFoundError(f"task {task!r} does not exist")
            if state == TaskState.LEARNING:
                raise FailedPreconditionError(f"task {task!r} is still being learned; wait for its learn job")
            if state in (TaskState.UNLEARNING, TaskState.UNLEARNED):
                if not request.allow_unlearned:
                    raise FailedPreconditionError(
                        f"task {task!r} is {state.value}; predictions are refused (an admin may audit it with "
                        "allow_unlearned)"
                    )
                principal = current_principal()
                if not principal.has("admin"):
                    raise PermissionDeniedError("allow_unlearned needs the 'admin' scope")
                audit_as = principal.name
            elif task in answering.forgetting:
                raise UnavailableError(
                    f"task {task!r}: samples of it are being forgotten (job {answering.forgetting[task]}); "
                    "predictions resume when the job ends"
                )
        else:
            if request.task:
                raise InvalidArgumentError(
                    "task", f"must be empty: strategy {self.model.strategy!r} is class-incremental (one output space)"
                )
            if request.allow_unlearned:
                raise InvalidArgumentError("allow_unlearned", "applies only to task-incremental strategies")
        inputs = v.inputs_tensor(request.inputs, self.samples, "inputs", self.defaults.max_predict_samples)
        if audit_as is not None:
            self.jobs.audit(audit_as, "predict.unlearned", task=task or "", samples=len(inputs))
        try:
            writable = np.require(inputs, requirements="W")  # torch wants a writable buffer; a copy if read-only
            logits = predictor.predict(task, torch.from_numpy(writable), allow_unlearned=request.allow_unlearned)
        except UnknownTaskError:
            raise NotFoundError(f"task {task!r} is not in the published model") from None
        except UnlearnedTaskError:
            raise FailedPreconditionError(f"task {task!r} is unlearned; predictions are refused") from None
        classes = logits.argmax(dim=1).numpy().astype(np.int64)
        outputs = torch.softmax(logits, dim=1) if request.return_probabilities else logits
        response = pb.PredictResponse(
            outputs=to_tensor(outputs.numpy().astype(np.float32)),
            classes=classes.tolist(),
            model_version=predictor.version,
        )
        self.telemetry.predict_latency.observe(time.perf_counter() - started)
        return response

    # ------------------------------------------------------------------- Jobs
    def GetJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        with self._call("GetJob", context):
            return job_message(self.jobs.get_job(v.job_id(request.id)))
        raise AssertionError("unreachable")

    def WatchJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> Iterator[pb.Job]:
        with self._call("WatchJob", context):
            job_id = v.job_id(request.id)
            last: pb.Job | None = None
            events = self.jobs.events
            seen = events.counter
            while context.is_active():
                job = self.jobs.get_job(job_id)
                message = job_message(job)
                if message != last:
                    yield message
                    last = message
                if job.state.terminal:
                    return
                if events.closed:
                    raise UnavailableError("the server is shutting down; watch again after it restarts")
                time.sleep(_WATCH_MIN_INTERVAL)
                seen = events.wait(seen, timeout=5.0)

    def CancelJob(self, request: pb.GetJobRequest, context: grpc.ServicerContext) -> pb.Job:
        with self._call("CancelJob", context):
            job_id = v.job_id(request.id)
            principal = current_principal()
            if self.jobs.get_job(job_id).kind == JobKind.UNLEARN and not principal.has("admin"):
                raise PermissionDeniedError("cancelling an unlearn job needs the 'admin' scope")
            return job_message(self.jobs.cancel(job_id, principal.name))
        raise AssertionError("unreachable")

    def ListJobs(self, request: pb.ListJobsRequest, context: grpc.ServicerContext) -> pb.ListJobsResponse:
        with self._call("ListJobs", context):
            state = _enum_or_none(JobState, pb.JobState, request.state, "state")
            task = v.task_name(request.task) if request.task else None
            jobs = self.jobs.list_jobs(state, task, _cursor(request.after_seq), _limit(request.limit))
            return pb.ListJobsResponse(jobs=[job_message(j) for j in jobs])
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ Tasks
    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.Task:
        with self._call("GetTask", context):
            return task_message(self.jobs.get_task(v.task_name(request.name, "name")))
        raise AssertionError("unreachable")

    def ListTasks(self, request: pb.ListTasksRequest, context: grpc.ServicerContext) -> pb.ListTasksResponse:
        with self._call("ListTasks", context):
            state = _enum_or_none(TaskState, pb.TaskState, request.state, "state")
            return pb.ListTasksResponse(tasks=[task_message(t) for t in self.jobs.list_tasks(state)])
        raise AssertionError("unreachable")

    # ------------------------------------------------------- Audit, model, evals
    def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: grpc.ServicerContext
    ) -> pb.ListAuditEventsResponse:
        with self._call("ListAuditEvents", context):
            task = v.task_name(request.task) if request.task else None
            events = self.jobs.list_audit(_cursor(request.after_seq), _limit(request.limit), task)
            return pb.ListAuditEventsResponse(events=[audit_message(e) for e in events])
        raise AssertionError("unreachable")

    def GetAuditHead(self, request: pb.GetAuditHeadRequest, context: grpc.ServicerContext) -> pb.AuditHead:
        with self._call("GetAuditHead", context):
            proofs = self._proofs()
            head = proofs.audit_head()
            return pb.AuditHead(
                seq=head.seq, hash=head.hash, signature=head.signature, public_key=proofs.key.public_key.pem
            )
        raise AssertionError("unreachable")

    def GetForgettingCertificate(
        self, request: pb.GetForgettingCertificateRequest, context: grpc.ServicerContext
    ) -> pb.ForgettingCertificate:
        with self._call("GetForgettingCertificate", context):
            task = v.task_name(request.task) if request.task else ""
            job_id = v.job_id(request.job_id, "job_id") if request.job_id else ""
            issued = self._proofs().certificate(task=task, job_id=job_id, principal=current_principal().name)
            return pb.ForgettingCertificate(
                document=issued.document, signature=issued.signature, public_key=issued.public_key
            )
        raise AssertionError("unreachable")

    def _proofs(self) -> ProofService:
        if self.proofs is None:
            raise FailedPreconditionError("this server was started without an audit signing key")
        return self.proofs

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        with self._call("GetModel", context):
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
        raise AssertionError("unreachable")

    def ListEvaluations(
        self, request: pb.ListEvaluationsRequest, context: grpc.ServicerContext
    ) -> pb.ListEvaluationsResponse:
        with self._call("ListEvaluations", context):
            rows = self.jobs.list_evaluations(_cursor(request.after_job_seq), _limit(request.limit))
            return pb.ListEvaluationsResponse(evaluations=[evaluation_message(r) for r in rows])
        raise AssertionError("unreachable")


def _ended_early(context: grpc.ServicerContext) -> bool:
    """Whether the client cancelled the call or its deadline passed.

    A client stream that is cancelled half-way can end the request iterator exactly like a complete
    one (grpc/grpc#33038); the cancellation itself is delivered moments later. Asked after the spool's
    fsync, this tells the two apart, so a truncated stream is never recorded as a job.
    """
    return not context.is_active() or context.time_remaining() <= 0


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
