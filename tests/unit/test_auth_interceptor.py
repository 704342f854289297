"""The auth interceptor reuses a wrapped handler per method and principal, and never across principals."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from server.rpc.auth import SERVICE, AuthInterceptor, TokenTable, current_principal, hash_token


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str, token: str) -> None:
        self.method = method
        self.invocation_metadata = (("authorization", f"Bearer {token}"),)


async def _principal_of(interceptor: AuthInterceptor, handler: grpc.RpcMethodHandler, token: str) -> tuple[Any, str]:
    async def continuation(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return handler

    wrapped = await interceptor.intercept_service(continuation, _Details(f"{SERVICE}Predict", token))
    assert wrapped is not None
    return wrapped, await wrapped.unary_unary(b"request", None)


def test_each_principal_gets_its_own_wrapped_handler_and_calls_run_as_their_caller() -> None:
    async def behavior(request: Any, context: Any) -> str:
        return current_principal().name

    handler = grpc.unary_unary_rpc_method_handler(behavior)
    tokens = TokenTable([f"alice:{hash_token('a')}:predict", f"bob:{hash_token('b')}:predict"])
    interceptor = AuthInterceptor(tokens)

    async def calls() -> list[tuple[Any, str]]:
        # each call in its own task, as grpc.aio runs them: the principal never leaks between calls
        return [await asyncio.create_task(_principal_of(interceptor, handler, t)) for t in ("a", "b", "a", "b")]

    (alice, first), (bob, second), (alice_again, third), (bob_again, fourth) = asyncio.run(calls())
    assert [first, second, third, fourth] == ["alice", "bob", "alice", "bob"]
    assert alice is alice_again and bob is bob_again and alice is not bob

    replaced = grpc.unary_unary_rpc_method_handler(behavior)  # the service's handler changed: wrapped anew
    wrapped, name = asyncio.run(_principal_of(interceptor, replaced, "a"))
    assert name == "alice" and wrapped is not alice
