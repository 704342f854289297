"""Bearer-token authentication and scope checks, as a gRPC server interceptor.

Tokens are configured only as SHA-256 hashes (``principal:<sha256>:scope+scope``). Every method of
``lethe.v1.Lethe`` needs a scope; ``admin`` implies all of them. Health and reflection stay open.
The authenticated principal is available to handlers through :func:`current_principal`.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

log = logging.getLogger(__name__)

SERVICE = "/lethe.v1.Lethe/"
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


def _abort_handler(code: grpc.StatusCode, message: str, streaming: bool) -> grpc.RpcMethodHandler:
    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks the bearer token and scope of every Lethe RPC; records the principal for the handler."""

    def __init__(self, tokens: TokenTable | None, on_denied: Callable[[str, str, str], None] | None = None) -> None:
        """Args:
        tokens: the token table, or None when authentication is disabled (everyone is ``anonymous`` admin).
        on_denied: called with (method, code name, principal or "") for every refused call (audit, metrics).
        """
        self.tokens = tokens
        self.on_denied = on_denied

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method_path: str = handler_call_details.method
        if handler is None or not method_path.startswith(SERVICE):
            return handler
        method = method_path[len(SERVICE) :]
        if self.tokens is None:
            principal = ANONYMOUS
        else:
            token = ""
            for key, value in handler_call_details.invocation_metadata or ():
                if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                    token = value[len("Bearer ") :].strip()
            found = self.tokens.authenticate(token) if token else None
            if found is None:
                self._denied(method, "UNAUTHENTICATED", "")
                return _abort_handler(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing or invalid token: send 'authorization: Bearer <token>' metadata",
                    handler.request_streaming,
                )
            scope = METHOD_SCOPES.get(method, "admin")
            if not found.has(scope):
                self._denied(method, "PERMISSION_DENIED", found.name)
                return _abort_handler(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method} needs the '{scope}' scope",
                    handler.request_streaming,
                )
            principal = found
        return _with_principal(handler, principal)

    def _denied(self, method: str, code: str, principal: str) -> None:
        log.warning("refused %s: %s", method, code, extra={"principal": principal or "-"})
        if self.on_denied is not None:
            self.on_denied(method, code, principal)


def _with_principal(handler: grpc.RpcMethodHandler, principal: Principal) -> grpc.RpcMethodHandler:
    """Wrap a handler so the behaviour runs with ``principal`` as :func:`current_principal`."""

    def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            token = _current.set(principal)
            try:
                return behavior(request, context)
            finally:
                _current.reset(token)

        return run

    def streaming(behavior: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            token = _current.set(principal)
            try:
                yield from behavior(request, context)
            finally:
                _current.reset(token)

        return run

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            streaming(handler.unary_stream), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        streaming(handler.stream_stream), handler.request_deserializer, handler.response_serializer
    )
