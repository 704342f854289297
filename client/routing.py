"""Several servers behind one client: writes to the primary, reads round-robin (DESIGN.md section 9).

A primary reports the health service :data:`PRIMARY_SERVICE` SERVING; its hot standbys and the read
replicas report it NOT_SERVING. The router finds the primary by asking each address (lazily, before
the first write) and asks again after a write fails because the address it used is not the primary
(any more) or cannot be reached; the client's retries then reach the new one. Reads go round-robin
over every address; a unary read that finds its address away (UNAVAILABLE) is sent to the next.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.errors import from_rpc_error

#: The health service only the serving primary reports SERVING.
PRIMARY_SERVICE = "lethe.primary"
#: Calls that write (or audit), sent to the primary only.
WRITES = frozenset({"Learn", "Unlearn", "CancelJob", "Commit", "LocateSamples", "Export"})
#: Seconds each address gets to answer the health check that finds the primary.
PROBE_SECONDS = 2.0
#: Failures of a write that make the router look for the primary again.
_NOT_THE_PRIMARY = frozenset({"NOT_PRIMARY", "READ_REPLICA"})


def split_targets(target: str | Sequence[str]) -> list[str]:
    """``"a:1,b:2"`` or a list of addresses -> the addresses (at least one)."""
    parts = target.split(",") if isinstance(target, str) else list(target)
    addresses = [p.strip() for p in parts if p.strip()]
    if not addresses:
        raise ValueError("target: give at least one host:port")
    return addresses


class Router:
    """Stands in for the generated stub: ``router.Predict(request, ...)`` as ``stub.Predict(request, ...)``.

    Args:
        stubs: one stub per address.
        channels: their channels (for the health checks).
        addresses: the addresses, for messages.
    """

    def __init__(self, stubs: Sequence[Any], channels: Sequence[grpc.Channel], addresses: Sequence[str]) -> None:
        self.stubs = list(stubs)
        self.health = [health_pb2_grpc.HealthStub(c) for c in channels]
        self.addresses = list(addresses)
        self._primary: int | None = None
        self._turn = itertools.cycle(range(len(self.stubs)))
        self._lock = threading.Lock()

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)

        def write(*args: Any, **kwargs: Any) -> Any:
            try:
                return getattr(self.stubs[self.primary()], method)(*args, **kwargs)
            except grpc.RpcError as exc:
                if _lost_the_primary(exc):
                    self.forget_primary()
                raise

        def read(*args: Any, **kwargs: Any) -> Any:
            for attempt in range(len(self.stubs)):
                try:
                    return getattr(self.stubs[self._next()], method)(*args, **kwargs)
                except grpc.RpcError as exc:  # reads are idempotent: an address that is away is skipped
                    if attempt == len(self.stubs) - 1 or from_rpc_error(exc).code != grpc.StatusCode.UNAVAILABLE:
                        raise
            raise AssertionError("unreachable")

        return write if method in WRITES else read

    def _next(self) -> int:
        with self._lock:
            return next(self._turn)

    def forget_primary(self) -> None:
        """The next write looks for the primary again."""
        with self._lock:
            self._primary = None

    def primary(self) -> int:
        """The index of the address whose server is the primary now (probed when not known)."""
        with self._lock:
            if self._primary is not None:
                return self._primary
        for index, health in enumerate(self.health):
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(service=PRIMARY_SERVICE), timeout=PROBE_SECONDS)
            except grpc.RpcError:
                continue
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                with self._lock:
                    self._primary = index
                return index
        # None is the primary right now (a takeover in progress): the first address answers, most
        # likely UNAVAILABLE NOT_PRIMARY, which the client retries.
        return 0


def _lost_the_primary(exc: grpc.RpcError) -> bool:
    error = from_rpc_error(exc)
    return error.reason in _NOT_THE_PRIMARY or error.code == grpc.StatusCode.UNAVAILABLE
