"""The gRPC edge: servicer, validation, error mapping, auth interceptor, server construction."""

from server.rpc.auth import AuthInterceptor, Principal, TokenTable, current_principal, hash_token
from server.rpc.server import SERVICE_NAME, create_server
from server.rpc.servicer import LearnDefaults, LetheServicer, ModelDescription

__all__ = [
    "SERVICE_NAME",
    "AuthInterceptor",
    "LearnDefaults",
    "LetheServicer",
    "ModelDescription",
    "Principal",
    "TokenTable",
    "create_server",
    "current_principal",
    "hash_token",
]
