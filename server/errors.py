"""Domain exceptions. The RPC edge maps each class to one gRPC status code (server.rpc.errors).

Every error may name a machine-readable ``reason`` (the ``google.rpc.ErrorInfo`` reason: UPPER_SNAKE,
stable, e.g. ``TASK_EXISTS``, ``QUEUE_FULL``), ``metadata`` for it (ErrorInfo metadata: what the
reason is about, e.g. ``{"task": "digits-01"}``) and ``retry_after`` seconds when a retry of the same
request can succeed later. Without a reason the edge sends its default for the class
(``server.rpc.errors.EDGE``). Reasons are listed in docs/errors.md.
"""

from __future__ import annotations

from collections.abc import Mapping


class LetheError(Exception):
    """Base class of every error the server reports to a client on purpose.

    Args:
        message: what went wrong and what is allowed, for a person (the gRPC status message).
        reason: ErrorInfo reason (UPPER_SNAKE); None = the edge's default for the class.
        retry_after: seconds after which the same request may succeed (sent as ``RetryInfo``);
            None = the edge's default for the class.
        metadata: ErrorInfo metadata (short strings about the reason: a task, a limit, ...).
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        retry_after: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.retry_after = retry_after
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgumentError(LetheError):
    """A request field is malformed; ``field`` names it in the proto's dotted notation.

    The status message is ``"<field>: <description>"``; the edge also sends ``field`` and
    ``description`` as a ``google.rpc.BadRequest.FieldViolation``.
    """

    def __init__(
        self,
        field: str,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{field}: {message}", reason=reason, metadata=metadata)
        self.field = field
        self.description = message


class NotFoundError(LetheError):
    """An unknown task or job."""


class AlreadyExistsError(LetheError):
    """The thing a request would create exists already (a task name that is taken or was used)."""


class FailedPreconditionError(LetheError):
    """The request is well formed but not allowed in the current state."""


class ResourceExhaustedError(LetheError):
    """A queue or size limit was reached."""


class UnauthenticatedError(LetheError):
    """No token or an invalid token."""


class PermissionDeniedError(LetheError):
    """The token lacks the scope this call needs."""


class UnavailableError(LetheError):
    """The server is starting or shutting down; the client may retry."""
