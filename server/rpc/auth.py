"""Bearer-token authentication and scope checks, as a ``grpc.aio`` server interceptor.

Tokens are configured only as SHA-256 hashes (``principal:<sha256>:scope+scope``). Every method of
``lethe.v1.Lethe`` needs a scope; ``admin`` implies all of them. The Open Inference Protocol needs
``predict``, except its liveness and readiness probes, which stay open like health and reflection.
The authorization scheme is case-insensitive (RFC 7235): ``Bearer``, ``bearer``, ``BEARER``.
The authenticated principal is available to handlers through :func:`current_principal`.

The interceptor also turns a request that does not decode into INVALID_ARGUMENT (counted, no
traceback in the log) instead of letting gRPC fail the call with an internal error.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from server.errors import InvalidArgumentError, LetheError, PermissionDeniedError, UnauthenticatedError
from server.rpc.errors import rich_status

log = logging.getLogger(__name__)

SERVICE = "/lethe.v1.Lethe/"
INFERENCE = "/inference.GRPCInferenceService/"
#: Open Inference Protocol methods that answer without a token (liveness/readiness probes).
OPEN_INFERENCE_METHODS = frozenset({"ServerLive", "ServerReady"})
#: Scope each method needs. "any" = any valid token (read-only status calls).
METHOD_SCOPES: dict[str, str] = {
    "Learn": "learn",
    "Unlearn": "unlearn",
    "Predict": "predict",
    "PredictStream": "predict",
    "CancelJob": "learn",
    "ListAuditEvents": "admin",
    "GetAuditHead": "admin",  # as ListAuditEvents: the head is checked against the events
    "GetForgettingCertificate": "admin",
    "LocateSamples": "admin",
    "Commit": "learn",
    "Export": "admin",  # takes the model out of the server's control; audited
    "GetJob": "any",
    "WatchJob": "any",
    "ListJobs": "any",
    "GetTask": "any",
    "ListTasks": "any",
    "GetModel": "any",
    "ListEvaluations": "any",
}


@dataclass(frozen=True)
class Principal:
    """Who is calling and what they may do."""

    name: str
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        """Whether this principal holds ``scope`` (admin holds every scope)."""
        return scope == "any" or "admin" in self.scopes or scope in self.scopes


ANONYMOUS = Principal("anonymous", frozenset({"admin"}))
_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("lethe_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The principal of the RPC being handled on this thread."""
    return _current.get()


def hash_token(token: str) -> str:
    """SHA-256 hex digest of a token, as written in the configuration."""
    return hashlib.sha256(token.encode()).hexdigest()


class TokenTable:
    """Configured token hashes -> principals."""

    def __init__(self, entries: Sequence[str]) -> None:
        self._entries: list[tuple[str, Principal]] = []
        for entry in entries:
            name, digest, scopes = entry.split(":")
            self._entries.append((digest, Principal(name, frozenset(scopes.split("+")))))

    def authenticate(self, token: str) -> Principal | None:
        """The principal whose token hashes to the configured digest, or None (constant-time compare)."""
        digest = hash_token(token)
        found = None
        for expected, principal in self._entries:
            if hmac.compare_digest(expected, digest):
                found = principal
        return found


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The token of an ``authorization: Bearer <token>`` header (scheme case-insensitive), or ""."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


class RefusalLog:
    """Rate-limited audit of refused calls: anyone can provoke them, so they must not grow the audit table.

    At most ``per_minute`` refusals are audited in any minute; the others are counted and reported as
    ``suppressed`` in the next audited one. Every refusal is counted in metrics by the caller.
    """

    def __init__(
        self, audit: Callable[[str, str, str, int], None], per_minute: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.audit = audit
        self.per_minute = per_minute
        self.clock = clock
        self._window_start = clock()
        self._in_window = 0
        self._suppressed = 0

    def refused(self, method: str, code: str, principal: str) -> bool:
        """Record one refusal; return whether it was audited (with the refusals suppressed before it)."""
        now = self.clock()
        if now - self._window_start >= 60.0:
            self._window_start, self._in_window = now, 0
        if self.per_minute <= 0 or self._in_window >= self.per_minute:
            self._suppressed += 1
            return False
        self._in_window += 1
        suppressed, self._suppressed = self._suppressed, 0
        self.audit(method, code, principal, suppressed)
        return True


class _Undecodable:
    """Stands for a request message that did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class AuthInterceptor(aio.ServerInterceptor):
    """Checks the bearer token and scope of every Lethe and inference RPC; records the principal.

    Args:
        tokens: the token table, or None when authentication is disabled (everyone is ``anonymous`` admin).
        on_denied: called with (method, code name, principal or "") for every refused call (audit, metrics);
            it runs on the event loop and must not block.
        on_undecodable: called with the method name for every request that did not decode (metrics).
    """

    def __init__(
        self,
        tokens: TokenTable | None,
        on_denied: Callable[[str, str, str], None] | None = None,
        on_undecodable: Callable[[str], None] | None = None,
    ) -> None:
        self.tokens = tokens
        self.on_denied = on_denied
        self.on_undecodable = on_undecodable
        #: (method path, principal) -> (the service's handler, its wrapped handler): wrapping builds closures
        #: and a handler object, the same for every call of a method by a principal. Bounded by the
        #: methods times the configured tokens' principals.
        self._wrapped: dict[tuple[str, Principal], tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method_path: str = handler_call_details.method
        if handler is None:
            return None
        if method_path.startswith(SERVICE):
            method, scope = method_path[len(SERVICE) :], None
        elif method_path.startswith(INFERENCE):
            method = method_path[len(INFERENCE) :]
            scope = "any" if method in OPEN_INFERENCE_METHODS else "predict"
        else:
            return handler  # health and reflection stay open
        if self.tokens is None:
            principal = ANONYMOUS
        else:
            token = bearer_token(handler_call_details.invocation_metadata)
            found = self.tokens.authenticate(token) if token else None
            if scope == "any" and found is None:
                found = Principal("anonymous", frozenset())
            if found is None:
                self._denied(method, "UNAUTHENTICATED", "")
                return _abort_handler(
                    handler,
                    UnauthenticatedError(
                        "missing or invalid token: send 'authorization: Bearer <token>' metadata",
                        reason="TOKEN_INVALID" if token else "TOKEN_MISSING",
                    ),
                )
            scope = scope or METHOD_SCOPES.get(method, "admin")
            if not found.has(scope):
                self._denied(method, "PERMISSION_DENIED", found.name)
                return _abort_handler(
                    handler,
                    PermissionDeniedError(
                        f"{method} needs the '{scope}' scope",
                        reason="SCOPE_MISSING",
                        metadata={"scope": scope, "method": method},
                    ),
                )
            principal = found
        cached = self._wrapped.get((method_path, principal))
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[(method_path, principal)] = (
                handler,
                _wrap(handler, principal, method, self.on_undecodable),
            )
        return cached[1]

    def _denied(self, method: str, code: str, principal: str) -> None:
        log.warning("refused %s: %s", method, code, extra={"principal": principal or "-"})
        if self.on_denied is not None:
            self.on_denied(method, code, principal)


def _abort_handler(handler: grpc.RpcMethodHandler, error: LetheError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that refuses the call with ``error``'s rich status."""
    status = rich_status(error)

    async def deny(request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(status.code, status.message, status.trailing_metadata)

    async def deny_stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(status.code, status.message, status.trailing_metadata)
        yield  # pragma: no cover - makes this an async generator

    make = _SHAPES[(handler.request_streaming, handler.response_streaming)]
    behavior = deny_stream if handler.response_streaming else deny
    return make(behavior, _tolerant(handler.request_deserializer), handler.response_serializer)


_SHAPES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A deserializer that returns an :class:`_Undecodable` marker instead of raising."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(exc)

    return parse


def _undecodable_message(method: str, marker: _Undecodable) -> str:
    return f"not a valid {method} request message ({type(marker.error).__name__})"


def _wrap(
    handler: grpc.RpcMethodHandler,
    principal: Principal,
    method: str,
    on_undecodable: Callable[[str], None] | None,
) -> grpc.RpcMethodHandler:
    """Wrap a handler: the behaviour runs with ``principal`` current, and undecodable requests are refused."""

    async def refuse(context: aio.ServicerContext, marker: _Undecodable) -> None:
        if on_undecodable is not None:
            on_undecodable(method)
        status = rich_status(
            InvalidArgumentError("request", _undecodable_message(method, marker), reason="UNDECODABLE")
        )
        await context.abort(status.code, status.message, status.trailing_metadata)

    async def checked(requests: AsyncIterator[Any], context: aio.ServicerContext) -> AsyncIterator[Any]:
        async for request in requests:
            if isinstance(request, _Undecodable):
                await refuse(context, request)
            yield request

    streaming_in = handler.request_streaming
    behavior = (
        (handler.unary_unary or handler.stream_unary if not handler.response_streaming else None)
        or handler.unary_stream
        or handler.stream_stream
    )

    async def unary(request: Any, context: aio.ServicerContext) -> Any:
        _current.set(principal)  # the call runs in its own task: this does not leak to other calls
        if streaming_in:
            request = checked(request, context)
        elif isinstance(request, _Undecodable):
            await refuse(context, request)
        return await behavior(request, context)

    async def streaming(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        _current.set(principal)
        if streaming_in:
            request = checked(request, context)
        elif isinstance(request, _Undecodable):
            await refuse(context, request)
        async for response in behavior(request, context):
            yield response

    make = _SHAPES[(streaming_in, handler.response_streaming)]
    return make(
        streaming if handler.response_streaming else unary,
        _tolerant(handler.request_deserializer),
        handler.response_serializer,
    )
