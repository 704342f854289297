"""Building the gRPC server: servicer, health, reflection, interceptors, message limits."""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import lethe_pb2 as pb
from protos import lethe_pb2_grpc as pb_grpc
from server.rpc.auth import AuthInterceptor
from server.rpc.servicer import LetheServicer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Lethe"].full_name


def create_server(
    servicer: LetheServicer,
    health_servicer: health.HealthServicer,
    auth: AuthInterceptor,
    *,
    address: str,
    threads: int,
    max_message_bytes: int,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, int]:
    """Create (not start) the server and bind ``address``; return it with the bound port.

    Raises:
        RuntimeError: when the address cannot be bound.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lethe-rpc"),
        interceptors=[auth],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=threads * 16,
    )
    pb_grpc.add_LetheServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot listen on {address}")
    return server, port
