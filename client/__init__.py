"""Python client for the Lethe server: numpy in, numpy out. Needs no torch.

Example::

    from client import LetheClient
    from client.datasets import load_digits

    with LetheClient("127.0.0.1:50051") as lethe:
        digits = load_digits().select([0, 1])
        job = lethe.learn("digits-01", digits.inputs, digits.labels)
        lethe.wait(job.id)
        classes = lethe.predict("digits-01", digits.inputs[:5]).classes
        lethe.wait(lethe.unlearn("digits-01", reason="customer request").id)

Failed calls raise the typed exceptions of :mod:`client.errors` (all subclasses of
:class:`client.errors.LetheError`), never ``grpc.RpcError``::

    try:
        lethe.learn("digits-01", digits.inputs, digits.labels)
    except AlreadyExistsError:
        ...  # the name is taken: task names are never reused
    except InvalidArgumentError as error:
        print(error.field_violations)  # [("chunk[1].labels.data", "labels must be in [0, 10), got 12")]
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import grpc
import numpy as np

from client.errors import (
    AlreadyExistsError,
    CallCancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LetheError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    from_rpc_error,
)
from client.routing import Router, split_targets
from protos import lethe_pb2 as pb
from protos import lethe_pb2_grpc as pb_grpc
from protos.tensors import from_tensor, to_tensor

__all__ = [
    "EXPORT_FORMATS",
    "AlreadyExistsError",
    "CallCancelledError",
    "DeadlineExceededError",
    "ExportError",
    "ExportResult",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "JobFailedError",
    "LetheClient",
    "LetheError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "Prediction",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "from_rpc_error",
    "pb",
]
T = TypeVar("T")

#: Default bytes of input data per streamed chunk (well under the 16 MiB message limit).
DEFAULT_CHUNK_BYTES = 1 << 20
_RETRYABLE = (UnavailableError, DeadlineExceededError)
#: Longest pause between retries, whatever the server's RetryInfo asks.
_MAX_RETRY_DELAY = 5.0
_TERMINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
#: Formats :meth:`LetheClient.export` writes (``ExportFormat`` names in lower case).
EXPORT_FORMATS = ("onnx", "torchscript", "safetensors")


class JobFailedError(RuntimeError):
    """A waited-for job ended FAILED or CANCELLED (the call itself succeeded: not a :class:`LetheError`)."""

    def __init__(self, job: pb.Job) -> None:
        super().__init__(
            f"job {job.id} ({pb.JobKind.Name(job.kind)} {job.task}) {pb.JobState.Name(job.state)}: {job.message}"
        )
        self.job = job


class ExportError(RuntimeError):
    """An exported file arrived incomplete or altered (size or SHA-256 not as the server announced)."""


@dataclass(frozen=True)
class ExportResult:
    """An exported network written to disk.

    Attributes:
        path: the file.
        bytes: its size.
        sha256: hex SHA-256 of its content, as the server computed it and this client checked it.
        model_version: the model version whose network it is.
        input_shape: shape of one sample the network takes (the batch dimension comes first and is free).
        format: one of :data:`EXPORT_FORMATS`.
    """

    path: Path
    bytes: int
    sha256: str
    model_version: int
    input_shape: tuple[int, ...]
    format: str


@dataclass(frozen=True)
class Prediction:
    """Predict's answer as numpy arrays."""

    outputs: np.ndarray  # float32 [n, num_classes]: logits, or probabilities when requested
    classes: np.ndarray  # int64 [n]
    model_version: int


class LetheClient:
    """A connection to a Lethe server, or to a primary with its standbys and read replicas.

    Args:
        target: ``host:port``; or several, comma-separated or as a list: writes then go to the
            primary (found by its health, see :mod:`client.routing`) and reads round-robin.
        token: bearer token sent as ``authorization`` metadata (omit when the server runs ``--no-auth``).
        root_certificates: PEM of the CA that signed the server's certificate; enables TLS.
        certificate_chain, private_key: PEM client certificate and key for mutual TLS.
        retries: attempts for calls that fail with UNAVAILABLE (Learn and Unlearn reuse one idempotency key,
            so a retry never creates a second job).
        timeout: seconds for each unary call.

    Every method raises :class:`client.errors.LetheError` subclasses for failed calls.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        certificate_chain: bytes | None = None,
        private_key: bytes | None = None,
        retries: int = 5,
        timeout: float = 60.0,
        max_message_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        addresses = split_targets(target)
        if root_certificates is not None or certificate_chain is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self.channels = [grpc.secure_channel(a, credentials, options=options) for a in addresses]
        else:
            self.channels = [grpc.insecure_channel(a, options=options) for a in addresses]
        self.channel = self.channels[0]
        stubs = [pb_grpc.LetheStub(c) for c in self.channels]
        self.stub: Any = stubs[0] if len(stubs) == 1 else Router(stubs, self.channels, addresses)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.retries = retries
        self.timeout = timeout

    def close(self) -> None:
        """Close the channels."""
        for channel in self.channels:
            channel.close()

    def __enter__(self) -> LetheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _call(call: Callable[[], T]) -> T:
        """One call; a failure raises its typed :class:`LetheError`."""
        try:
            return call()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc

    def _retry(self, call: Callable[[], T]) -> T:
        """:meth:`_call`, again after UNAVAILABLE or DEADLINE_EXCEEDED (waiting at least the server's RetryInfo)."""
        delay = 0.2
        for attempt in range(max(self.retries, 1)):
            try:
                return self._call(call)
            except _RETRYABLE as exc:
                if attempt >= self.retries - 1:
                    raise
                time.sleep(min(max(delay, exc.retry_after or 0.0), _MAX_RETRY_DELAY))
                delay = min(delay * 2, _MAX_RETRY_DELAY)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ learning
    def learn(
        self,
        task: str,
        inputs: np.ndarray,
        labels: np.ndarray,
        *,
        epochs: int = 0,
        batch_size: int = 0,
        learning_rate: float = 0.0,
        holdout_fraction: float = 0.0,
        temporary: bool = False,
        ttl_seconds: int = 0,
        metadata: dict[str, str] | None = None,
        idempotency_key: str | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        progress: Callable[[int, int], None] | None = None,
        sample_ids: Sequence[str] | None = None,
    ) -> pb.Job:
        """Stream ``inputs`` ``[n, *input_shape]`` and int ``labels`` ``[n]`` as a Learn; return the queued job.

        Zero-valued options take the server's defaults. ``progress(sent_samples, total)`` is called per chunk.
        A retry after UNAVAILABLE resends the stream with the same idempotency key. ``sample_ids``
        (one unique id per sample) name the samples for a later :meth:`forget_samples`; without
        them sample ``i`` is ``job.sample_id_prefix + str(i)``.

        ``temporary`` learns the task into an exactly forgettable side network (CLPU): :meth:`unlearn`
        deletes it, :meth:`commit` merges it into the model. ``ttl_seconds`` (temporary only; 0 = the
        server's ``limits.temporary_ttl_seconds``) unlearns it automatically if it is not committed in time.
        """
        if sample_ids is not None and len(sample_ids) != len(labels):
            raise ValueError(f"sample_ids: {len(sample_ids)} ids for {len(labels)} samples")
        inputs = np.asarray(inputs)
        labels = np.asarray(labels).astype(np.int64)
        if inputs.dtype not in (np.uint8, np.float16, np.float32, np.float64):
            inputs = inputs.astype(np.float32)
        key = idempotency_key or uuid.uuid4().hex
        header = pb.LearnHeader(
            task=task,
            idempotency_key=key,
            mode=pb.LearnHeader.TEMPORARY if temporary else pb.LearnHeader.PERMANENT,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            holdout_fraction=holdout_fraction,
            metadata=metadata or {},
            ttl_seconds=ttl_seconds,
        )
        per_sample = max(1, int(inputs[:1].nbytes))
        rows = max(1, chunk_bytes // per_sample)

        def stream() -> Iterator[pb.LearnRequest]:
            yield pb.LearnRequest(header=header)
            for start in range(0, len(labels), rows):
                stop = min(start + rows, len(labels))
                chunk = pb.SampleChunk(
                    inputs=to_tensor(inputs[start:stop]),
                    labels=to_tensor(labels[start:stop]),
                    sample_ids=list(sample_ids[start:stop]) if sample_ids is not None else [],
                )
                yield pb.LearnRequest(chunk=chunk)
                if progress is not None:
                    progress(stop, len(labels))

        return self._retry(lambda: self.stub.Learn(stream(), metadata=self.metadata))

    def unlearn(self, task: str, *, reason: str = "", method: str = "", idempotency_key: str | None = None) -> pb.Job:
        """Ask the server to forget ``task``; return the unlearn job."""
        request = pb.UnlearnRequest(
            task=task, reason=reason, method=method, idempotency_key=idempotency_key or uuid.uuid4().hex
        )
        return self._retry(lambda: self.stub.Unlearn(request, metadata=self.metadata, timeout=self.timeout))

    def commit(self, task: str, *, idempotency_key: str | None = None) -> pb.Job:
        """Merge the TEMPORARY ``task`` into the model (distillation of its side network); return the commit job."""
        request = pb.CommitRequest(task=task, idempotency_key=idempotency_key or uuid.uuid4().hex)
        return self._retry(lambda: self.stub.Commit(request, metadata=self.metadata, timeout=self.timeout))

    def forget_samples(
        self,
        sample_ids: Sequence[str],
        *,
        task: str = "",
        reason: str = "",
        idempotency_key: str | None = None,
    ) -> pb.Job:
        """Forget these samples wherever they were learned (``task`` set: only there); return the unlearn job."""
        request = pb.UnlearnRequest(
            task=task,
            reason=reason,
            sample_ids=list(sample_ids),
            idempotency_key=idempotency_key or uuid.uuid4().hex,
        )
        return self._retry(lambda: self.stub.Unlearn(request, metadata=self.metadata, timeout=self.timeout))

    def locate(self, sample_ids: Sequence[str]) -> pb.LocateSamplesResponse:
        """Which tasks hold these sample ids, and how many no task holds (admin)."""
        request = pb.LocateSamplesRequest(sample_ids=list(sample_ids))
        return self._retry(lambda: self.stub.LocateSamples(request, metadata=self.metadata, timeout=self.timeout))

    # ---------------------------------------------------------- prediction
    def predict(
        self,
        task: str | None,
        inputs: np.ndarray,
        *,
        probabilities: bool = False,
        allow_unlearned: bool = False,
    ) -> Prediction:
        """Predict ``inputs`` ``[n, *input_shape]``; ``task`` None for class-incremental strategies."""
        array = np.asarray(inputs)
        if array.dtype not in (np.uint8, np.float16, np.float32, np.float64):
            array = array.astype(np.float32)
        request = pb.PredictRequest(
            task=task or "",
            inputs=to_tensor(array),
            return_probabilities=probabilities,
            allow_unlearned=allow_unlearned,
        )
        response: pb.PredictResponse = self._retry(
            lambda: self.stub.Predict(request, metadata=self.metadata, timeout=self.timeout)
        )
        return Prediction(
            from_tensor(response.outputs), np.asarray(response.classes, dtype=np.int64), response.model_version
        )

    def export(self, task: str | None, fmt: str, out: Path | str, *, timeout: float = 600.0) -> ExportResult:
        """Write the network Predict serves for ``task`` to ``out`` in format ``fmt`` (admin; audited).

        ``task`` is None for class-incremental strategies. The stream goes to a temporary file next to
        ``out``, is checked against the size and SHA-256 the server announces, and is renamed over
        ``out`` only then: ``out`` is never left half-written. The file is readable by its owner only
        (mode 0600): it holds everything the model learned from the task's data.

        Raises:
            ValueError: ``fmt`` is not one of :data:`EXPORT_FORMATS`.
            ExportError: the file did not arrive as announced (nothing is written to ``out``).
            LetheError: the server refused (e.g. PermissionDeniedError without the admin scope).
        """
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
        request = pb.ExportRequest(task=task or "", format=fmt.upper())
        target = Path(out)

        def download() -> ExportResult:
            handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            try:
                with os.fdopen(handle, "wb") as file:
                    result = self._receive_export(request, file, target, fmt, timeout)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(temporary, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
                raise
            return result

        return self._retry(download)

    def _receive_export(
        self, request: pb.ExportRequest, file: BinaryIO, target: Path, fmt: str, timeout: float
    ) -> ExportResult:
        digest = hashlib.sha256()
        received, announced, version, shape, sha256 = 0, -1, 0, (), ""
        for index, chunk in enumerate(self.stub.Export(request, metadata=self.metadata, timeout=timeout)):
            if index == 0:
                announced, version, shape = chunk.total_bytes, chunk.model_version, tuple(chunk.input_shape)
            if chunk.data:
                file.write(chunk.data)
                digest.update(chunk.data)
                received += len(chunk.data)
            sha256 = chunk.sha256 or sha256
        if received != announced:
            raise ExportError(f"export of {target.name}: received {received} bytes, the server announced {announced}")
        if not sha256 or digest.hexdigest() != sha256:
            raise ExportError(
                f"export of {target.name}: SHA-256 {digest.hexdigest()} differs from the server's "
                f"{sha256 or '(none sent)'}"
            )
        return ExportResult(target, received, sha256, version, shape, fmt)

    # ---------------------------------------------------------------- jobs
    def job(self, job_id: str) -> pb.Job:
        """The job's current state."""
        request = pb.GetJobRequest(id=job_id)
        return self._retry(lambda: self.stub.GetJob(request, metadata=self.metadata, timeout=self.timeout))

    def watch(self, job_id: str) -> Iterator[pb.Job]:
        """Every state change of a job, ending at its terminal state (closing the iterator ends the call)."""
        call = self.stub.WatchJob(pb.GetJobRequest(id=job_id), metadata=self.metadata)
        try:
            yield from call
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from exc
        finally:
            call.cancel()

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        progress: Callable[[pb.Job], None] | None = None,
        check: bool = True,
    ) -> pb.Job:
        """Block until the job ends; raise :class:`JobFailedError` if it did not succeed (``check``).

        Raises:
            DeadlineExceededError: (a :class:`TimeoutError`) the job did not end within ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.job(job_id)
        while job.state not in _TERMINAL:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            call = self.stub.WatchJob(pb.GetJobRequest(id=job_id), metadata=self.metadata, timeout=remaining)
            try:
                for update in call:
                    job = update
                    if progress is not None:
                        progress(job)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
                if isinstance(error, DeadlineExceededError):
                    raise DeadlineExceededError(
                        f"job {job_id} did not finish within {timeout} s", reason=error.reason
                    ) from exc
                if not isinstance(error, _RETRYABLE):
                    raise error from exc
                time.sleep(min(max(0.5, error.retry_after or 0.0), _MAX_RETRY_DELAY))
                job = self.job(job_id)
            finally:
                call.cancel()
        if check and job.state != pb.SUCCEEDED:
            raise JobFailedError(job)
        return job

    def cancel(self, job_id: str) -> pb.Job:
        """Cancel a queued job, or a running learn (returns once it has stopped, the model as before it)."""
        return self._call(
            lambda: self.stub.CancelJob(pb.GetJobRequest(id=job_id), metadata=self.metadata, timeout=self.timeout)
        )

    def jobs(
        self, *, state: pb.JobState = pb.JOB_STATE_UNSPECIFIED, task: str = "", after_seq: int = 0, limit: int = 0
    ) -> list[pb.Job]:
        """A page of jobs in submission order."""
        request = pb.ListJobsRequest(state=state, task=task, after_seq=after_seq, limit=limit)
        return list(self._call(lambda: self.stub.ListJobs(request, metadata=self.metadata, timeout=self.timeout)).jobs)

    # ------------------------------------------------------- tasks, model
    def task(self, name: str) -> pb.Task:
        """One task."""
        request = pb.GetTaskRequest(name=name)
        return self._call(lambda: self.stub.GetTask(request, metadata=self.metadata, timeout=self.timeout))

    def tasks(self, *, state: pb.TaskState = pb.TASK_STATE_UNSPECIFIED) -> list[pb.Task]:
        """Every task (optionally in one state)."""
        request = pb.ListTasksRequest(state=state)
        return list(
            self._call(lambda: self.stub.ListTasks(request, metadata=self.metadata, timeout=self.timeout)).tasks
        )

    def model(self) -> pb.ModelInfo:
        """What the server's model is."""
        return self._call(
            lambda: self.stub.GetModel(pb.GetModelRequest(), metadata=self.metadata, timeout=self.timeout)
        )

    def evaluations(self) -> list[pb.Evaluation]:
        """The whole accuracy matrix, oldest job first."""
        rows: list[pb.Evaluation] = []
        after = 0
        while True:
            request = pb.ListEvaluationsRequest(after_job_seq=after, limit=1000)
            call = partial(self.stub.ListEvaluations, request, metadata=self.metadata, timeout=self.timeout)
            page = self._call(call).evaluations
            rows.extend(page)
            if len(page) < 1000:
                return rows
            after = page[-1].job_seq

    def audit_events(self, *, task: str = "") -> list[pb.AuditEvent]:
        """The whole audit trail (optionally of one task), oldest first."""
        events: list[pb.AuditEvent] = []
        after = 0
        while True:
            request = pb.ListAuditEventsRequest(after_seq=after, limit=1000, task=task)
            call = partial(self.stub.ListAuditEvents, request, metadata=self.metadata, timeout=self.timeout)
            page = self._call(call).events
            events.extend(page)
            if len(page) < 1000:
                return events
            after = page[-1].seq

    def audit_head(self) -> pb.AuditHead:
        """The server's signed audit head (seq, hash, signature) and its audit public key (PEM)."""
        request = pb.GetAuditHeadRequest()
        return self._call(lambda: self.stub.GetAuditHead(request, metadata=self.metadata, timeout=self.timeout))

    def forgetting_certificate(self, *, task: str = "", job_id: str = "") -> pb.ForgettingCertificate:
        """A signed forgetting certificate: of ``task``'s newest successful unlearn, or of unlearn job ``job_id``.

        Write it with :func:`client.audit.certificate_file`; check it with :func:`client.audit.verify_certificate`.
        """
        request = pb.GetForgettingCertificateRequest(task=task, job_id=job_id)
        return self._call(
            lambda: self.stub.GetForgettingCertificate(request, metadata=self.metadata, timeout=self.timeout)
        )
