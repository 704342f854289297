"""``LetheClient.export`` writes a file only when it arrived as the server announced it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from client import ExportError, LetheClient, pb

CONTENT = bytes(range(256)) * 41  # 10 496 bytes


class CannedExport:
    """A stub whose Export streams the given messages and remembers the request."""

    def __init__(self, messages: Sequence[pb.ExportChunk]) -> None:
        self.messages = list(messages)
        self.requests: list[pb.ExportRequest] = []

    def Export(  # noqa: N802 - the stub's method name
        self, request: pb.ExportRequest, metadata: object = None, timeout: object = None
    ) -> Iterator[pb.ExportChunk]:
        self.requests.append(request)
        return iter(self.messages)


def stream(data: bytes, *, total: int | None = None, sha256: str | None = None) -> list[pb.ExportChunk]:
    """The server's framing: the facts, then 4 KiB pieces, the digest on the last."""
    digest = hashlib.sha256(data).hexdigest() if sha256 is None else sha256
    pieces = [data[i : i + 4096] for i in range(0, len(data), 4096)]
    first = pb.ExportChunk(model_version=7, input_shape=[1, 8, 8], total_bytes=len(data) if total is None else total)
    rest = [pb.ExportChunk(data=p, sha256=digest if i == len(pieces) - 1 else "") for i, p in enumerate(pieces)]
    return [first, *rest]


def client_with(stub: CannedExport) -> LetheClient:
    client = LetheClient("127.0.0.1:1", retries=1)  # never connects: the stub answers
    client.stub = stub  # type: ignore[assignment]
    return client


def test_a_complete_stream_is_written_and_described(tmp_path: Path) -> None:
    stub = CannedExport(stream(CONTENT))
    with client_with(stub) as client:
        result = client.export(None, "torchscript", tmp_path / "model.pt")
    assert (tmp_path / "model.pt").read_bytes() == CONTENT
    assert (result.bytes, result.sha256) == (len(CONTENT), hashlib.sha256(CONTENT).hexdigest())
    assert (result.model_version, result.input_shape, result.format) == (7, (1, 8, 8), "torchscript")
    assert stub.requests == [pb.ExportRequest(task="", format=pb.TORCHSCRIPT)]
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left


@pytest.mark.parametrize(
    "messages",
    [
        stream(CONTENT, sha256="0" * 64),  # altered on the way
        stream(CONTENT[:-1], total=len(CONTENT)),  # cut short
        stream(CONTENT, sha256=""),  # no digest at all
    ],
    ids=["digest", "size", "no-digest"],
)
def test_a_damaged_stream_leaves_the_target_untouched(tmp_path: Path, messages: list[pb.ExportChunk]) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the previous export")
    with client_with(CannedExport(messages)) as client, pytest.raises(ExportError):
        client.export("task", "onnx", target)
    assert target.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_an_unknown_format_is_refused_before_any_call(tmp_path: Path) -> None:
    stub = CannedExport(stream(CONTENT))
    with client_with(stub) as client, pytest.raises(ValueError, match="onnx, torchscript, safetensors"):
        client.export("task", "pickle", tmp_path / "model.pkl")
    assert stub.requests == [] and list(tmp_path.iterdir()) == []
