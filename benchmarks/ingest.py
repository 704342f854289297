"""Learn ingest throughput: a real Lethe Learn against a bare gRPC client-streaming echo of the same bytes.

Both sides receive the same ``LearnRequest`` stream, produced by the same :meth:`LetheClient.learn`
(1 MiB chunks), over the same kind of server (same thread-pool size and message-size options):

- **baseline**: a minimal grpcio server whose ``lethe.v1.Lethe/Learn`` handler only parses the
  messages (the generated deserializer) and counts the bytes of each chunk, then returns a Job;
- **Lethe**: the real server's Learn, which validates every chunk (dtype, shape, finite values,
  labels in range, limits), appends it to a spool file (SHA-256 on the way), fsyncs the file and
  its directory, and records the job and an audit event in SQL before it returns.

The time is the wall time of the client's call, from the first message to the returned Job. After
each Lethe measurement the job is cancelled if it is still queued, or waited for (one epoch of a
small MLP) so that no training overlaps the next measurement.

A breakdown measures the steps of the server's path one at a time, single-threaded, on the same
chunks, with the server's own functions; it shows where the time goes.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from benchmarks.report import BenchmarkResult, RunOptions
from benchmarks.servers import bare_server, lethe_server
from benchmarks.timing import Stopwatch, compare, interleaved
from client import DEFAULT_CHUNK_BYTES, FailedPreconditionError, LetheClient
from protos import lethe_pb2 as pb
from protos.tensors import from_tensor, to_tensor
from server.config import ServerSection
from server.data.spool import SpoolWriter
from server.rpc import validation as v

NAME = "ingest"
MB = 1_000_000
#: The issue's goal: Lethe's ingest at least half as fast as the bare echo.
GOAL = 0.5


@dataclass(frozen=True)
class IngestSettings:
    """The workload.

    Attributes:
        megabytes: payload per stream (inputs and labels), in MB (10^6 bytes).
        repeats: measurements of each side (interleaved).
        input_shape: shape of one sample; float32 CIFAR-shaped by default.
        chunk_bytes: input bytes per chunk, as :meth:`LetheClient.learn` sends them.
        threads: gRPC thread-pool size of both servers.
        max_message_bytes: message-size limit of both servers and the client.
    """

    megabytes: int = 128
    repeats: int = 7
    input_shape: tuple[int, ...] = (3, 32, 32)
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    threads: int = ServerSection.threads
    max_message_bytes: int = ServerSection.max_message_bytes


FULL = IngestSettings()
QUICK = IngestSettings(megabytes=2, repeats=1)


def make_payload(settings: IngestSettings, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Float32 inputs in [0, 1) ``[n, *input_shape]`` and int64 labels ``[n]`` of about ``megabytes`` MB."""
    per_sample = 4 * int(np.prod(settings.input_shape)) + 8
    n = max(2, settings.megabytes * MB // per_sample)
    rng = np.random.default_rng(seed)
    inputs = rng.random((n, *settings.input_shape), dtype=np.float32)
    labels = rng.integers(0, 10, size=n, dtype=np.int64)
    return inputs, labels


def echo_handlers() -> dict[str, grpc.RpcMethodHandler]:
    """``Learn`` that parses every message (the generated deserializer), touches its bytes and returns a Job."""

    def learn(requests: Iterator[pb.LearnRequest], context: grpc.ServicerContext) -> pb.Job:
        received = 0
        for message in requests:
            received += len(message.chunk.inputs.data)  # touch the payload, as any consumer must
        return pb.Job(id="echo", kind=pb.LEARN, state=pb.QUEUED, metrics={"bytes": float(received)})

    return {
        "Learn": grpc.stream_unary_rpc_method_handler(
            learn, request_deserializer=pb.LearnRequest.FromString, response_serializer=pb.Job.SerializeToString
        )
    }


def _settle(client: LetheClient, job: pb.Job) -> None:
    """Make sure the job's training cannot overlap the next measurement: cancel it, or wait for it."""
    try:
        client.cancel(job.id)
    except FailedPreconditionError:  # already running or done
        client.wait(job.id, timeout=600, check=False)


#: The steps :func:`breakdown` times, in path order.
BREAKDOWN_STEPS = (
    "client (both sides): to_tensor copy + SerializeToString",
    "server (both sides): parse LearnRequest",
    "Lethe: validate chunk (inputs_tensor, labels_tensor, sample_ids)",
    "&nbsp;&nbsp;of which: from_tensor + astype(float32) copy",
    "&nbsp;&nbsp;of which: np.isfinite(x).all()",
    "Lethe: np.unique(labels)",
    "Lethe: spool append (np.save copy + SHA-256 + write)",
    "&nbsp;&nbsp;of which: SHA-256",
    "Lethe: commit (fsync file, rename, fsync directory)",
)


def breakdown(inputs: np.ndarray, labels: np.ndarray, settings: IngestSettings, scratch: Path) -> dict[str, float]:
    """Seconds of each step of the ingest path for the whole payload, one chunk at a time, one thread.

    Follows a chunk from the client's encoding through the server's own validation and spool
    writer, timing each step separately (steps marked "of which" repeat part of the step above on
    their own, to split it). Chunks are processed as a stream, like the server does, so memory is
    reused rather than freshly faulted in.
    """
    per_sample = max(1, int(inputs[:1].nbytes))
    rows = max(1, settings.chunk_bytes // per_sample)
    limits = v.SampleLimits(settings.input_shape, 10)
    steps = dict.fromkeys(BREAKDOWN_STEPS, 0.0)
    digest = hashlib.sha256()
    clock = time.perf_counter
    with SpoolWriter(scratch, "breakdown.spool") as spool:
        for index, start in enumerate(range(0, len(labels), rows)):
            stop = min(start + rows, len(labels))
            t0 = clock()
            wire = pb.LearnRequest(
                chunk=pb.SampleChunk(inputs=to_tensor(inputs[start:stop]), labels=to_tensor(labels[start:stop]))
            ).SerializeToString()
            t1 = clock()
            message = pb.LearnRequest.FromString(wire)
            t2 = clock()
            chunk = message.chunk
            x = v.inputs_tensor(chunk.inputs, limits, f"chunk[{index}].inputs", 1 << 30)
            y = v.labels_tensor(chunk.labels, len(x), 10, f"chunk[{index}].labels")
            ids = v.sample_ids(list(chunk.sample_ids), len(x), f"chunk[{index}].sample_ids")
            t3 = clock()
            from_tensor(chunk.inputs).astype(np.float32)
            t4 = clock()
            np.isfinite(x).all()
            t5 = clock()
            np.unique(y)
            t6 = clock()
            spool.append(x, y, ids)
            t7 = clock()
            digest.update(x.data)
            t8 = clock()
            for key, seconds in zip(
                BREAKDOWN_STEPS[:-1],
                (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6, t8 - t7),
                strict=True,
            ):
                steps[key] += seconds
        with Stopwatch() as t:
            spool.commit()
        steps[BREAKDOWN_STEPS[-1]] = t.seconds
    spool.blobs.delete(spool.relative)
    return steps


def run(options: RunOptions) -> BenchmarkResult:
    """Run the ingest benchmark; return its result."""
    settings = QUICK if options.quick else FULL
    log = options.log
    inputs, labels = make_payload(settings)
    payload = inputs.nbytes + labels.nbytes
    megabytes = payload / MB
    root = Path(tempfile.mkdtemp(prefix="ingest-", dir=options.data_dir))
    result = BenchmarkResult(NAME, "Learn ingest throughput")
    with Stopwatch() as total:
        server_settings = {
            "model.backbone": "mlp",
            "model.width": 64,
            "model.input_shape": ",".join(map(str, settings.input_shape)),
            "server.threads": settings.threads,
            "server.max_message_bytes": settings.max_message_bytes,
            "limits.max_stream_bytes": 1 << 40,
            "limits.max_queued_jobs": 1000,
        }
        with (
            bare_server(
                "benchmarks.ingest:echo_handlers",
                threads=settings.threads,
                max_message_bytes=settings.max_message_bytes,
            ) as echo,
            lethe_server(root / "lethe", server_settings) as lethe,
        ):
            client = lethe.client
            names = (f"ingest-{r}" for r in itertools.count())

            def echo_rate() -> float:
                with Stopwatch() as t:
                    reply = echo.learn("echo", inputs, labels, chunk_bytes=settings.chunk_bytes)
                if reply.metrics["bytes"] != inputs.nbytes:
                    raise RuntimeError(f"echo received {reply.metrics['bytes']} bytes, sent {inputs.nbytes}")
                return megabytes / t.seconds

            def lethe_rate() -> float:
                with Stopwatch() as t:
                    job = client.learn(
                        next(names), inputs, labels, epochs=1, batch_size=1024, chunk_bytes=settings.chunk_bytes
                    )
                _settle(client, job)
                return megabytes / t.seconds

            # The warm-up round covers connections, the allocator, first-call paths and the first SQL transaction.
            rates = interleaved(
                {"echo": echo_rate, "Lethe": lethe_rate},
                settings.repeats,
                log=lambda r, x: log(
                    f"  ingest {r}/{settings.repeats}: echo {x['echo']:.0f} MB/s, Lethe {x['Lethe']:.0f} MB/s"
                ),
            )
            echo_rates, lethe_rates = rates["echo"], rates["Lethe"]
        runs = [breakdown(inputs, labels, settings, root) for _ in range(settings.repeats)]
        steps = [(name, statistics.median(r[name] for r in runs)) for name in BREAKDOWN_STEPS]
    shutil.rmtree(root, ignore_errors=True)

    shape = "×".join(map(str, settings.input_shape))
    result.comparisons.append(
        compare(
            f"Learn stream, {megabytes:.0f} MB float32 [n,{','.join(map(str, settings.input_shape))}], "
            f"{settings.chunk_bytes // 1024} KiB chunks",
            "MB/s",
            "bare gRPC echo",
            echo_rates,
            lethe_rates,
            GOAL,
        )
    )
    result.tables.append(
        (
            f"Where the time goes: each step of the path timed alone over the same {megabytes:.0f} MB, "
            f"chunk by chunk, one thread, no gRPC (median of {settings.repeats})",
            ["step", "seconds", "MB/s if alone", "share of Lethe's median stream time"],
            [
                [
                    name,
                    f"{seconds:.3f}",
                    f"{megabytes / seconds:,.0f}" if seconds > 0 else "∞",
                    f"{100 * seconds * result.comparisons[0].lethe.median / megabytes:.0f}%",
                ]
                for name, seconds in steps
            ],
        )
    )
    result.settings = {
        "samples per stream": f"{len(labels):,} of {shape} float32",
        "payload": f"{payload:,} bytes",
        "repetitions": str(settings.repeats),
        "gRPC threads": str(settings.threads),
        "max message": f"{settings.max_message_bytes // (1 << 20)} MiB",
        "spool directory": "a temporary directory (same file system as the repository by default)",
        "cpu count": str(os.cpu_count()),
    }
    result.seconds = total.seconds
    return result
