"""Reading the ``google.rpc.Status`` a failed call carries in ``grpc-status-details-bin``, as a raw client would
(``grpc_status.rpc_status.from_call``), independently of the client library's own decoder."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass
class StatusDetails:
    """The details of one failed call."""

    reason: str | None = None
    domain: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: ``(field, description)`` of every ``BadRequest`` field violation.
    field_violations: list[tuple[str, str]] = field(default_factory=list)
    #: ``RetryInfo.retry_delay`` in seconds, None when absent.
    retry_after: float | None = None
    #: Type names of every detail, in order.
    kinds: list[str] = field(default_factory=list)


def status_details(err: grpc.RpcError) -> StatusDetails | None:
    """The decoded details of ``err``, or None when it carries no ``google.rpc.Status``.

    ``from_call`` raises ValueError when the Status contradicts the call's code or message: a test failure.
    """
    assert isinstance(err, grpc.Call)
    status = rpc_status.from_call(err)
    if status is None:
        return None
    found = StatusDetails()
    for detail in status.details:
        found.kinds.append(detail.TypeName())
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            found.reason, found.domain, found.metadata = info.reason, info.domain, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.field_violations += [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            found.retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return found
