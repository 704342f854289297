"""The one table that maps exceptions to gRPC status codes, and the rich status sent with them.

Every failed call carries, besides its code and message, a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer (``grpcio-status``) holding:

* ``ErrorInfo(reason, domain="lethe.v1", metadata)`` on every error: the reason is the exception's
  own, or the default of its row in :data:`EDGE`;
* ``BadRequest.FieldViolation(field, description)`` for INVALID_ARGUMENT, with the field path the
  validator names (``chunk[1].labels.data``);
* ``RetryInfo(retry_delay)`` where the same request may succeed later (UNAVAILABLE, a full queue,
  an unreachable database).

Clients that ignore the trailer still get the code and the message.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy.exc import DBAPIError, OperationalError

from server.engine.protocol import UnknownTaskError, UnlearnedTaskError
from server.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    LetheError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

log = logging.getLogger(__name__)

#: ``ErrorInfo.domain`` of every error Lethe sends.
DOMAIN = "lethe.v1"
#: Longest description copied into a detail: the trailer must stay well under the 8 KiB metadata limit.
_MAX_DETAIL_CHARS = 1024


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _database_down(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


@dataclass(frozen=True)
class EdgeRow:
    """How one kind of exception is answered."""

    kind: type[BaseException]
    code: grpc.StatusCode
    #: ErrorInfo reason when the exception names none.
    reason: str
    #: RetryInfo delay (seconds) when the exception names none; None = a retry cannot help.
    retry_after: float | None = None
    #: A fixed message instead of the exception's text (which may hold internals: SQL, paths).
    message: str | None = None
    #: A further condition on the exception (errno, driver state).
    when: Callable[[BaseException], bool] | None = None


#: The edge's table, first match wins. Domain errors (server.errors), the engine's errors, and the
#: infrastructure failures a client can act on; anything else is INTERNAL.
EDGE: tuple[EdgeRow, ...] = (
    EdgeRow(InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    EdgeRow(NotFoundError, grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    EdgeRow(AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS, "ALREADY_EXISTS"),
    EdgeRow(FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION"),
    EdgeRow(ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED"),
    EdgeRow(UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID"),
    EdgeRow(PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED, "SCOPE_MISSING"),
    EdgeRow(UnavailableError, grpc.StatusCode.UNAVAILABLE, "SERVER_UNAVAILABLE", retry_after=1.0),
    # The engine's errors (a predictor asked about a task it does not hold).
    EdgeRow(UnknownTaskError, grpc.StatusCode.NOT_FOUND, "TASK_NOT_FOUND"),
    EdgeRow(UnlearnedTaskError, grpc.StatusCode.FAILED_PRECONDITION, "TASK_UNLEARNED"),
    EdgeRow(
        OSError,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "DISK_FULL",
        message="the server's data disk is full; nothing was accepted, retry later",
        when=_disk_full,
    ),
    # The database is unreachable (restarting, failing over): nothing was written.
    EdgeRow(
        DBAPIError,
        grpc.StatusCode.UNAVAILABLE,
        "DATABASE_UNAVAILABLE",
        retry_after=2.0,
        message="the database is unavailable; nothing was changed, retry later",
        when=_database_down,
    ),
)
INTERNAL = EdgeRow(Exception, grpc.StatusCode.INTERNAL, "INTERNAL", message="internal error; see the server log")


def edge_row(exc: BaseException) -> EdgeRow:
    """The row of :data:`EDGE` that answers ``exc`` (INTERNAL when none does)."""
    for row in EDGE:
        if isinstance(exc, row.kind) and (row.when is None or row.when(exc)):
            return row
    return INTERNAL


def _message(exc: BaseException, row: EdgeRow) -> str:
    """The client-facing message; what it hides of an infrastructure failure goes to the log."""
    if row.reason == "DISK_FULL":
        log.error("data directory full: %s", exc)
    elif row.reason == "DATABASE_UNAVAILABLE":
        log.warning("database unavailable: %s", exc.orig if isinstance(exc, DBAPIError) else exc)
    if row.message is not None:
        return row.message
    if isinstance(exc, KeyError) and exc.args:  # str(KeyError) quotes its text
        return str(exc.args[0])
    return str(exc)


@dataclass(frozen=True)
class RichStatus:
    """What the edge sends for a failed call: code, message and ``grpc-status-details-bin`` trailing metadata.

    Send it with ``context.abort_with_status(status.grpc_status())`` (sync or ``grpc.aio``), or
    ``await context.abort(status.code, status.message, status.trailing_metadata)`` (``grpc.aio``).
    """

    code: grpc.StatusCode
    message: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()

    def grpc_status(self) -> grpc.Status:
        """The status as a :class:`grpc.Status` for ``ServicerContext.abort_with_status``."""
        return _Status(self.code, self.message, self.trailing_metadata)


@dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def rich_status(exc: BaseException) -> RichStatus:
    """The status of ``exc`` with its ``google.rpc.Status`` details (field violations, retry delay, reason)."""
    row = edge_row(exc)
    code, message = row.code, _message(exc, row)
    reason, retry_after, metadata = row.reason, row.retry_after, {}
    if isinstance(exc, LetheError):
        reason = exc.reason or reason
        retry_after = exc.retry_after if exc.retry_after is not None else retry_after
        metadata = dict(exc.metadata)
    status = status_pb2.Status(code=code.value[0], message=message)
    if isinstance(exc, InvalidArgumentError):
        metadata.setdefault("field", exc.field)
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=exc.description[:_MAX_DETAIL_CHARS]
        )
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(retry_after * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    info = error_details_pb2.ErrorInfo(
        reason=reason, domain=DOMAIN, metadata={k: v[:_MAX_DETAIL_CHARS] for k, v in metadata.items()}
    )
    status.details.add().Pack(info)
    return RichStatus(code, message, tuple(rpc_status.to_status(status).trailing_metadata))
