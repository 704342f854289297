"""The one table that maps domain exceptions to gRPC status codes."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

import grpc
from sqlalchemy.exc import DBAPIError, OperationalError

from server.errors import (
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

STATUS_OF: dict[type[LetheError], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and client-facing message for an exception.

    Unexpected exceptions become INTERNAL with a generic message (details go to the log only).
    """
    for kind, code in STATUS_OF.items():
        if isinstance(exc, kind):
            return code, str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        log.error("data directory full: %s", exc)
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the server's data disk is full; nothing was accepted, retry later"
    if isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        # The database is unreachable (restarting, failing over): nothing was written; retry later.
        log.warning("database unavailable: %s", exc.orig if isinstance(exc, DBAPIError) else exc)
        return grpc.StatusCode.UNAVAILABLE, "the database is unavailable; nothing was changed, retry later"
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


@dataclass(frozen=True)
class RichStatus:
    """What the edge sends for a failed call: code, message and ``grpc-status-details-bin`` trailing metadata."""

    code: grpc.StatusCode
    message: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = ()


def rich_status(exc: BaseException) -> RichStatus:
    """The status of ``exc`` with its ``google.rpc.Status`` details (field violations, retry delay, reason)."""
    code, message = status_for(exc)
    return RichStatus(code, message)
