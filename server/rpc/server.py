"""Building the ``grpc.aio`` server: services, health, reflection, interceptor, limits, keepalive.

Everything is served from one event loop: streams (WatchJob, Learn, PredictStream) are coroutines that
hold no thread, so they never starve unary calls or the health service; blocking work (SQL, files,
forward passes) runs on a bounded executor owned by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer as _AsyncHealthServicer
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from protos import inference as oip
from protos import lethe_pb2 as pb
from protos import lethe_pb2_grpc as pb_grpc
from server.rpc.auth import AuthInterceptor
from server.rpc.servicer import LetheServicer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Lethe"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"


class HealthServicer(_AsyncHealthServicer):
    """``grpc.health.v1.Health`` with ``List`` (the packaged servicer advertises it but does not answer it)."""

    async def List(self, request: health_pb2.HealthListRequest, context: aio.ServicerContext) -> Any:
        """Every registered service and its status."""
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()
            }
        )


class _Pools:
    """The default descriptor pool, then the Open Inference Protocol's own: what reflection describes."""

    def __init__(self, *pools: descriptor_pool.DescriptorPool) -> None:
        self.pools = pools

    def __getattr__(self, name: str) -> Any:
        def find(*args: Any) -> Any:
            for pool in self.pools:
                try:
                    return getattr(pool, name)(*args)
                except KeyError:
                    continue
            raise KeyError(args[0] if args else name)

        return find


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keepalive policy (``server.keepalive_*``)."""

    time_s: float = 30.0
    timeout_s: float = 10.0
    min_ping_interval_s: float = 0.5

    def options(self) -> list[tuple[str, int]]:
        """gRPC channel arguments of this policy."""
        return [
            ("grpc.keepalive_time_ms", int(self.time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Clients may ping this often, with or without calls, without being sent GOAWAY too_many_pings.
            ("grpc.http2.min_recv_ping_interval_without_data_ms", int(self.min_ping_interval_s * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.min_ping_interval_s * 1000)),
            ("grpc.http2.max_ping_strikes", 2),
        ]


def create_server(
    servicer: LetheServicer,
    health: HealthServicer,
    auth: AuthInterceptor,
    *,
    address: str,
    max_message_bytes: int,
    keepalive: Keepalive,
    max_concurrent_rpcs: int,
    extra_handlers: Sequence[grpc.GenericRpcHandler] = (),
    extra_services: Sequence[str] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[aio.Server, int]:
    """Create (not start) the server and bind ``address``; return it with the bound port.

    Call on the event loop that will run it. ``extra_handlers`` (the Open Inference Protocol) are
    served behind the same interceptor; ``extra_services`` names them for reflection.

    Raises:
        RuntimeError: when the address cannot be bound.
    """
    server = aio.server(
        interceptors=[auth],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
            *keepalive.options(),
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    pb_grpc.add_LetheServicer_to_server(servicer, _GenericOnly(server))
    health_pb2_grpc.add_HealthServicer_to_server(health, _GenericOnly(server))
    if extra_handlers:
        server.add_generic_rpc_handlers(tuple(extra_handlers))
    names = (SERVICE_NAME, *extra_services, HEALTH_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA)
    reflection = ReflectionServicer(names, pool=_Pools(descriptor_pool.Default(), oip.POOL))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection, server)
    # v1 is v1alpha under a new package name: the messages are identical on the wire.
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                REFLECTION_V1,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        reflection.ServerReflectionInfo,
                        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                    )
                },
            ),
        )
    )
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    return server, port


class _GenericOnly:
    """What a generated ``add_*_to_server`` registers, as generic handlers only.

    Generated code registers each service twice: a generic handler (methods looked up by name) and
    "registered methods". grpc.aio serves registered methods with one task per method waiting for
    calls, and its main loop waits on all of them again after every call: an ``asyncio.wait`` over 23
    tasks per call here, a share of the loop's time that grows with the number of methods. The
    generic handler alone serves every method.
    """

    def __init__(self, server: aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """Dropped: the generic handler added alongside serves these methods."""
