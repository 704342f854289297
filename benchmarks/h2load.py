"""A native gRPC load generator: nghttp2's ``h2load`` sending one prepared unary request over and over.

A Python gRPC client spends about 0.25 ms of CPU per call (protobuf, the GIL, the channel's threads),
as much as a small Predict costs the server: on a machine whose cores the servers share with their
clients, it measures the client as much as the servers. ``h2load`` (C, one event loop) costs a few
microseconds a call. It speaks HTTP/2 only, so the request is a gRPC frame written to a file (a zero
byte, the message length as 4 bytes big-endian, the serialized message) and POSTed with gRPC's
headers; h2load sees HTTP 200 even for a call that failed (gRPC's status travels in the trailers), so
what the servers answered is checked on their side (``lethe_grpc_requests_total`` by code).

Debian and Ubuntu package it as ``nghttp2-client``; :data:`H2LOAD` is None where it is not installed.
"""

from __future__ import annotations

import re
import resource
import shutil
import struct
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message

#: The h2load executable, None where it is not installed.
H2LOAD = shutil.which("h2load")
_FINISHED = re.compile(r"finished in ([\d.]+)s, ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
)


def grpc_frame(message: Message) -> bytes:
    """``message`` as the body of a unary gRPC request: uncompressed flag, length (big-endian), bytes."""
    payload = message.SerializeToString()
    return b"\0" + struct.pack(">I", len(payload)) + payload


@dataclass(frozen=True)
class Load:
    """What one h2load run against one server did in its timed window."""

    requests_per_second: float
    done: int
    failed: int


@dataclass(frozen=True)
class Loads:
    """Several h2load processes run together: each one's result and their CPU seconds (all of them)."""

    loads: list[Load]
    cpu_seconds: float

    @property
    def requests_per_second(self) -> float:
        """Requests per second of all of them together."""
        return sum(load.requests_per_second for load in self.loads)


def parse(output: str) -> Load:
    """The result of an h2load run from its report (ValueError when it did not finish)."""
    finished, requests = _FINISHED.search(output), _REQUESTS.search(output)
    if finished is None or requests is None:
        raise ValueError(f"h2load did not report a result:\n{output[-2000:]}")
    done, failed, errored = int(requests.group(3)), int(requests.group(5)), int(requests.group(6))
    return Load(float(finished.group(2)), done, failed + errored)


def command(
    target: str, method: str, body: Path, connections: int, streams: int, seconds: float, warmup: float
) -> list[str]:
    """The h2load command line: ``connections`` × ``streams`` calls in flight to ``method`` at ``target``."""
    if H2LOAD is None:
        raise RuntimeError("h2load is not installed (Debian/Ubuntu: apt-get install nghttp2-client)")
    return [
        H2LOAD,
        f"--duration={round(seconds * 1000)}ms",
        f"--warm-up-time={round(warmup * 1000)}ms",
        f"--clients={connections}",
        f"--max-concurrent-streams={streams}",
        f"--data={body}",
        "--header=content-type: application/grpc",
        "--header=te: trailers",
        f"http://{target}/{method.lstrip('/')}",
    ]


def run_together(
    targets: Sequence[str], method: str, body: Path, *, connections: int, streams: int, seconds: float, warmup: float
) -> Loads:
    """One h2load process per target, all at once; each ``connections`` × ``streams`` in flight.

    Their CPU time is this process's children's (``RUSAGE_CHILDREN``) across the run: call it with no other
    child process ending meanwhile.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    processes = [
        subprocess.Popen(
            command(target, method, body, connections, streams, seconds, warmup),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for target in targets
    ]
    outputs = [process.communicate(timeout=60 + 2 * (seconds + warmup))[0] for process in processes]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for process, output in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"h2load exited with {process.returncode}:\n{output[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Loads([parse(output) for output in outputs], cpu)
