"""The client library raises typed exceptions carrying what the server's rich status says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2
from sqlalchemy.exc import OperationalError

from client import (
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    LetheClient,
    LetheError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    from_rpc_error,
    pb,
)
from client.errors import error_class
from server.engine.protocol import UnknownTaskError
from server.errors import InvalidArgumentError as ServerInvalidArgument
from server.errors import ResourceExhaustedError as ServerResourceExhausted
from server.rpc.errors import rich_status
from tests.support import Running, digits, free_port, make_config, running_app


class FailedCall(grpc.RpcError, grpc.Call):
    """A failed call as grpc hands it to a client: code, details and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, Any], ...] = ()) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailing

    def initial_metadata(self) -> tuple[tuple[str, Any], ...]:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


def sent(exc: BaseException) -> FailedCall:
    """What a client receives when the server's edge answers ``exc``."""
    status = rich_status(exc)
    return FailedCall(status.code, status.message, status.trailing_metadata)


def test_a_field_violation_arrives_with_its_path() -> None:
    field, description = "chunk[1].labels.data", "labels must be in [0, 10), got 12"
    refusal = ServerInvalidArgument(field, description, reason="LABEL_OUT_OF_RANGE")
    error = from_rpc_error(sent(refusal))
    assert isinstance(error, InvalidArgumentError) and isinstance(error, LetheError)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "chunk[1].labels.data: labels must be in [0, 10), got 12"
    assert error.field_violations == [("chunk[1].labels.data", "labels must be in [0, 10), got 12")]
    assert error.field == "chunk[1].labels.data" and error.reason == "LABEL_OUT_OF_RANGE"
    assert error.metadata == {"field": "chunk[1].labels.data"} and error.retry_after is None
    assert str(error) == "INVALID_ARGUMENT: chunk[1].labels.data: labels must be in [0, 10), got 12"


def test_retry_info_and_reasons_arrive() -> None:
    queue = ServerResourceExhausted("the job queue is full", reason="QUEUE_FULL", retry_after=10.0, metadata={"n": "1"})
    full = from_rpc_error(sent(queue))
    assert isinstance(full, ResourceExhaustedError)
    assert (full.reason, full.retry_after, full.metadata) == ("QUEUE_FULL", 10.0, {"n": "1"})
    database = from_rpc_error(sent(OperationalError("SELECT 1", {}, Exception("connection refused"))))
    assert isinstance(database, UnavailableError)
    assert database.reason == "DATABASE_UNAVAILABLE" and database.retry_after == 2.0
    assert "connection refused" not in database.message  # internals stay in the server's log
    unknown = from_rpc_error(sent(UnknownTaskError("task 'x' was never learned")))  # the engine's error
    assert isinstance(unknown, NotFoundError) and unknown.reason == "TASK_NOT_FOUND"
    assert unknown.message == "task 'x' was never learned"
    bug = from_rpc_error(sent(ZeroDivisionError("secret")))
    assert isinstance(bug, InternalError) and bug.reason == "INTERNAL" and "secret" not in bug.message


def test_statuses_without_usable_details_keep_code_and_message() -> None:
    bare = from_rpc_error(FailedCall(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses"))
    assert isinstance(bare, UnavailableError) and bare.reason is None and bare.retry_after is None
    contradicting = status_pb2.Status(code=grpc.StatusCode.NOT_FOUND.value[0], message="another message")
    mismatch = FailedCall(
        grpc.StatusCode.UNAVAILABLE, "down", (("grpc-status-details-bin", contradicting.SerializeToString()),)
    )
    error = from_rpc_error(mismatch)
    assert isinstance(error, UnavailableError) and error.message == "down" and error.reason is None


def test_every_status_code_has_a_lethe_error_class() -> None:
    for code in grpc.StatusCode:
        if code != grpc.StatusCode.OK:
            assert issubclass(error_class(code), LetheError)
    assert issubclass(error_class(grpc.StatusCode.DEADLINE_EXCEEDED), TimeoutError)
    assert error_class(grpc.StatusCode.UNKNOWN) is InternalError


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("client-errors")
    with running_app(make_config(tmp / "data", f"sqlite:///{tmp / 'db.sqlite'}")) as running:
        yield running


def test_stubs_and_streams_raise_typed_errors(server: Running) -> None:
    client = server.client
    x, y = digits([0, 1])
    bad = y.copy()
    bad[5] = 10
    with pytest.raises(InvalidArgumentError) as refused:
        client.learn("bad", x, bad)
    assert refused.value.field == "chunk[1].labels.data" and refused.value.reason == "LABEL_OUT_OF_RANGE"
    with pytest.raises(NotFoundError) as unknown:
        list(client.watch("0" * 32))  # a stream
    assert unknown.value.reason == "JOB_NOT_FOUND" and unknown.value.metadata == {"job_id": "0" * 32}
    job = client.learn("long", x, y, epochs=10_000)
    with pytest.raises(DeadlineExceededError) as late:
        client.wait(job.id, timeout=0.5)
    assert isinstance(late.value, TimeoutError) and job.id in late.value.message
    assert client.cancel(job.id).state == pb.CANCELLED


def test_an_unreachable_server_is_unavailable_without_a_reason(tmp_path: Path) -> None:
    with LetheClient(f"127.0.0.1:{free_port()}", retries=2) as nowhere, pytest.raises(UnavailableError) as down:
        nowhere.tasks()
    assert down.value.reason is None and down.value.code == grpc.StatusCode.UNAVAILABLE
