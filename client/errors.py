"""Typed exceptions of the client library, decoded from the server's rich gRPC status.

Every method of :class:`client.LetheClient` raises a subclass of :class:`LetheError` instead of
``grpc.RpcError``; catch the base class to handle them all, or one subclass for one status code:

=============================  ======================  ==========================================
class                          status code             typical cause
=============================  ======================  ==========================================
:class:`InvalidArgumentError`  INVALID_ARGUMENT        a malformed field (``field_violations``)
:class:`NotFoundError`         NOT_FOUND               an unknown task, job or sample id
:class:`AlreadyExistsError`    ALREADY_EXISTS          a task name that is taken or was used
:class:`FailedPreconditionError` FAILED_PRECONDITION   not allowed in the current state
:class:`OutOfRangeError`       OUT_OF_RANGE            past the end of something that may grow
:class:`ResourceExhaustedError` RESOURCE_EXHAUSTED     a limit or a full queue (``retry_after``)
:class:`UnauthenticatedError`  UNAUTHENTICATED         no token or a wrong one
:class:`PermissionDeniedError` PERMISSION_DENIED       the token lacks a scope
:class:`UnavailableError`      UNAVAILABLE             server unreachable, starting or stopping
:class:`DeadlineExceededError` DEADLINE_EXCEEDED       the call's timeout passed (also a TimeoutError)
:class:`CallCancelledError`    CANCELLED               the call was cancelled
:class:`UnimplementedError`    UNIMPLEMENTED           the server does not offer this method
:class:`InternalError`         INTERNAL, UNKNOWN,      a server bug (see its log)
                               DATA_LOSS
:class:`LetheError`            any other code          (ABORTED, ...)
=============================  ======================  ==========================================

Each carries ``code``, ``message`` (the server's text), ``reason`` (``google.rpc.ErrorInfo``
reason such as ``TASK_EXISTS`` or ``QUEUE_FULL``; None when the server sent none, e.g. when it was
not reached), ``metadata`` (ErrorInfo metadata), ``field_violations`` (``(field, description)``
pairs of a ``google.rpc.BadRequest``) and ``retry_after`` (seconds from ``google.rpc.RetryInfo``,
or None when a retry cannot help).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "AlreadyExistsError",
    "CallCancelledError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "LetheError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "from_rpc_error",
]


class LetheError(Exception):
    """A call to the Lethe server failed.

    Attributes:
        code: the gRPC status code.
        message: the server's message (what went wrong, and what is allowed).
        reason: the ``ErrorInfo`` reason (UPPER_SNAKE), or None when the status carried none.
        metadata: the ``ErrorInfo`` metadata (e.g. ``{"task": "digits-01"}``).
        field_violations: ``(field, description)`` of each ``BadRequest`` field violation.
        retry_after: seconds after which the same call may succeed (``RetryInfo``), or None.
    """

    #: The status code a subclass stands for.
    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
        retry_after: float | None = None,
    ) -> None:
        self.code: grpc.StatusCode = code or self.default_code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: list[tuple[str, str]] = list(field_violations)
        self.retry_after = retry_after
        super().__init__(f"{self.code.name}: {message}")

    @property
    def field(self) -> str | None:
        """The first violated field's path (``chunk[1].labels.data``), or None."""
        return self.field_violations[0][0] if self.field_violations else None


class InvalidArgumentError(LetheError):
    """INVALID_ARGUMENT: a request field is malformed; ``field_violations`` name it."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(LetheError):
    """NOT_FOUND: an unknown task, job or sample id."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(LetheError):
    """ALREADY_EXISTS: a task name that is taken, or was used by an unlearned task (names are never reused)."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(LetheError):
    """FAILED_PRECONDITION: well formed, but not allowed in the current state (e.g. predicting an unlearned task)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRangeError(LetheError):
    """OUT_OF_RANGE: past the current end of something that may grow."""

    default_code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhaustedError(LetheError):
    """RESOURCE_EXHAUSTED: a size limit, or the job queue is full (then ``retry_after`` is set)."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnauthenticatedError(LetheError):
    """UNAUTHENTICATED: no token, or one the server does not know."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(LetheError):
    """PERMISSION_DENIED: the token lacks the scope the call needs (the message names it)."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class UnavailableError(LetheError):
    """UNAVAILABLE: the server cannot be reached, or is starting, stopping or without its database.

    ``reason`` is None when the server was not reached at all (connection refused, unknown host).
    """

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(LetheError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's timeout passed. Also a :class:`TimeoutError`."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class CallCancelledError(LetheError):
    """CANCELLED: the call was cancelled (by this client, or the server went away mid-call)."""

    default_code = grpc.StatusCode.CANCELLED


class UnimplementedError(LetheError):
    """UNIMPLEMENTED: the server does not offer this method (an older server)."""

    default_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(LetheError):
    """INTERNAL, UNKNOWN or DATA_LOSS: a failure inside the server; its log says more."""

    default_code = grpc.StatusCode.INTERNAL


_CLASSES: dict[grpc.StatusCode, type[LetheError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        OutOfRangeError,
        ResourceExhaustedError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
        DeadlineExceededError,
        CallCancelledError,
        UnimplementedError,
        InternalError,
    )
}
_CLASSES[grpc.StatusCode.UNKNOWN] = InternalError
_CLASSES[grpc.StatusCode.DATA_LOSS] = InternalError


def error_class(code: grpc.StatusCode) -> type[LetheError]:
    """The exception class raised for ``code``."""
    return _CLASSES.get(code, LetheError)


def from_rpc_error(err: grpc.RpcError) -> LetheError:
    """The typed exception of a failed call, with the details of its ``google.rpc.Status`` decoded.

    A status whose details cannot be read (none sent, or inconsistent) still gives the code and message.
    """
    code: grpc.StatusCode = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
    message: str = (err.details() if isinstance(err, grpc.Call) else str(err)) or ""
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    retry_after: float | None = None
    try:
        status = rpc_status.from_call(err) if isinstance(err, grpc.Call) else None
    except ValueError:  # details that contradict the code or message: ignore them
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason or None, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            violations += [(v.field, v.description) for v in request.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return error_class(code)(
        message,
        code=code,
        reason=reason,
        metadata=metadata,
        field_violations=violations,
        retry_after=retry_after,
    )
