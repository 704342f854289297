"""Message classes of the Open Inference Protocol (KServe v2 gRPC), from ``protos/inference.desc``.

The descriptors live in a private pool: a client library in the same process (tritonclient) registers
messages with the same full names (``inference.ModelInferRequest``) in protobuf's default pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE_NAME = "inference.GRPCInferenceService"
_DESCRIPTOR_SET = Path(__file__).with_name("inference.desc")

POOL = descriptor_pool.DescriptorPool()
for _file in descriptor_pb2.FileDescriptorSet.FromString(_DESCRIPTOR_SET.read_bytes()).file:
    POOL.Add(_file)
SERVICE = POOL.FindServiceByName(SERVICE_NAME)


def message(name: str) -> Any:
    """The message class ``inference.<name>`` (nested names with dots, e.g. ``ModelInferRequest.InferInputTensor``)."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"inference.{name}"))


ServerLiveRequest = message("ServerLiveRequest")
ServerLiveResponse = message("ServerLiveResponse")
ServerReadyRequest = message("ServerReadyRequest")
ServerReadyResponse = message("ServerReadyResponse")
ModelReadyRequest = message("ModelReadyRequest")
ModelReadyResponse = message("ModelReadyResponse")
ServerMetadataRequest = message("ServerMetadataRequest")
ServerMetadataResponse = message("ServerMetadataResponse")
ModelMetadataRequest = message("ModelMetadataRequest")
ModelMetadataResponse = message("ModelMetadataResponse")
ModelInferRequest = message("ModelInferRequest")
ModelInferResponse = message("ModelInferResponse")
InferParameter = message("InferParameter")
InferTensorContents = message("InferTensorContents")

#: Method name -> (request class, response class), in the service's order.
METHODS: dict[str, tuple[Any, Any]] = {
    m.name: (message(m.input_type.name), message(m.output_type.name)) for m in SERVICE.methods
}
