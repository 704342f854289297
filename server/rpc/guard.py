"""One wrapper around every RPC of both services: count it, log with the principal, map errors.

Domain errors become their status code with ``google.rpc.Status`` details (:func:`rich_status`);
unexpected exceptions become INTERNAL (logged with the traceback); a client that went away or whose
deadline passed is counted as CANCELLED / DEADLINE_EXCEEDED, never as a server error.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
from grpc import aio

from server.errors import ResourceExhaustedError
from server.logs import log_context
from server.rpc.auth import current_principal
from server.rpc.errors import rich_status
from server.telemetry import Telemetry

log = logging.getLogger(__name__)
R = TypeVar("R")


class CallGuard:
    """``async with guard(method, context):`` around the body of an RPC.

    Args:
        telemetry: where calls are counted.
        limits: the most calls of a method in flight at once (methods not named: no limit of their own,
            only the server's ``maximum_concurrent_rpcs``); one more is refused with RESOURCE_EXHAUSTED.
    """

    def __init__(self, telemetry: Telemetry, limits: Mapping[str, int] | None = None) -> None:
        self.telemetry = telemetry
        self.limits = dict(limits or {})
        self._in_flight: dict[str, int] = {}

    @asynccontextmanager
    async def __call__(self, method: str, context: aio.ServicerContext) -> AsyncIterator[None]:
        code = "OK"
        admitted = False
        try:
            with log_context(principal=current_principal().name):
                self._admit(method)
                admitted = True
                yield
        except asyncio.CancelledError:
            code = _ended_code(context)
            raise
        except aio.AbortError:
            code = _code_name(context.code())
            raise
        except Exception as exc:
            status = rich_status(exc)
            code = status.code.name
            if status.code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", method)
            await context.abort(status.code, status.message, status.trailing_metadata)
        finally:
            if admitted:
                self._in_flight[method] -= 1
            self.telemetry.grpc_requests.labels(method, code).inc()

    def _admit(self, method: str) -> None:
        """Count the call in; refuse it when its method is at its limit (the loop is single-threaded)."""
        limit = self.limits.get(method)
        running = self._in_flight.get(method, 0)
        if limit is not None and running >= limit:
            raise ResourceExhaustedError(
                f"{method}: {limit} calls are already in progress, the most this server takes at once; retry shortly",
                reason="TOO_MANY_CALLS",
                retry_after=1.0,
            )
        self._in_flight[method] = running + 1


def method_limits(threads: int) -> dict[str, int]:
    """Per-method limits of calls in flight, from ``server.threads`` (the executor's size).

    Learn streams each hold an open spool; an export holds a thread for seconds (one runs at a time);
    long streams (WatchJob, PredictStream) hold no thread but are capped so a client cannot exhaust memory.
    """
    return {
        "Learn": threads,
        "Export": 2,
        "LocateSamples": threads,
        "GetForgettingCertificate": threads,
        "WatchJob": threads * 64,
        "PredictStream": threads * 64,
    }


def _ended_code(context: aio.ServicerContext) -> str:
    """How a call that was cancelled under the handler ended: its deadline passed, or the client left."""
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


def _code_name(code: grpc.StatusCode | int | None) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "UNKNOWN"


async def run_blocking(executor: Executor, fn: Callable[..., R], *args: Any) -> R:
    """Run ``fn(*args)`` on ``executor`` with the caller's context (principal, log fields).

    If the call is cancelled meanwhile (the client left), the step still finishes before the
    cancellation unwinds the handler: cleanup never races a half-done step (a spool being written,
    a job being committed).
    """
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(executor, functools.partial(contextvars.copy_context().run, fn, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():  # gRPC may cancel a call's task more than once
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([future])
        raise
