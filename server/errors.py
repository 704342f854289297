"""Domain exceptions. The RPC edge maps each class to one gRPC status code (server.rpc.errors)."""

from __future__ import annotations


class LetheError(Exception):
    """Base class of every error the server reports to a client on purpose."""


class InvalidArgumentError(LetheError):
    """A request field is malformed; ``field`` names it in the proto's dotted notation."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFoundError(LetheError):
    """An unknown task or job."""


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
