"""Predict throughput: batches of 64 through gRPC against calling the same model in-process.

- **baseline**: the published predictor called directly,
  ``app.worker.strategy.predictor().predict(task, tensor)`` on a ready-made ``torch.Tensor``:
  exactly the model Predict serves, with none of the serving path;
- **Predict**: :meth:`LetheClient.predict` (numpy in, numpy out), one unary call per batch;
- **PredictStream**: one bidirectional stream per client thread, one request per batch.

Each is measured with 1 and 4 concurrent client threads (one shared channel), for two models:
the digits MLP (``[1,8,8]``, a model so small that per-call overhead dominates) and a CNN on
CIFAR-shaped ``[3,32,32]`` inputs (where the forward pass costs milliseconds).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import BenchmarkResult, RunOptions, Stopwatch, bench_config, compare, lethe_server
from client import LetheClient
from client.datasets import load_digits
from protos import lethe_pb2 as pb
from protos.tensors import from_tensor, to_tensor

NAME = "predict"
#: The issue's goal: gRPC Predict at least 80% of in-process throughput.
GOAL = 0.8


@dataclass(frozen=True)
class ModelCase:
    """One model to serve.

    Attributes:
        name: short label for the table.
        backbone: the backbone name.
        input_shape: shape of one sample.
        learn_samples: samples of the task learned before measuring (synthetic unless digits).
        digits: learn and predict sklearn's digits instead of random inputs.
    """

    name: str
    backbone: str
    input_shape: tuple[int, ...]
    learn_samples: int
    digits: bool = False


@dataclass(frozen=True)
class PredictSettings:
    """The workload.

    Attributes:
        batch: samples per request.
        threads: concurrent client threads to measure.
        seconds: duration of one measurement.
        repeats: measurements of each variant (interleaved with the baseline's).
        cases: the models.
        epochs: epochs of the learn job that precedes the measurements.
    """

    batch: int = 64
    threads: tuple[int, ...] = (1, 4)
    seconds: float = 2.0
    repeats: int = 5
    cases: tuple[ModelCase, ...] = (
        ModelCase("digits, mlp", "mlp", (1, 8, 8), 0, digits=True),
        ModelCase("CIFAR-shaped, cnn", "cnn", (3, 32, 32), 512),
    )
    epochs: int = 2


FULL = PredictSettings()
QUICK = PredictSettings(
    seconds=0.05,
    repeats=1,
    cases=(
        ModelCase("digits, mlp", "mlp", (1, 8, 8), 0, digits=True),
        ModelCase("CIFAR-shaped, cnn", "cnn", (3, 32, 32), 64),
    ),
    epochs=1,
)


def _task_data(case: ModelCase, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    if case.digits:
        data = load_digits()
        return data.inputs.astype(np.float32), data.labels.astype(np.int64)
    rng = np.random.default_rng(seed)
    inputs = rng.random((case.learn_samples, *case.input_shape), dtype=np.float32)
    return inputs, rng.integers(0, 10, size=case.learn_samples, dtype=np.int64)


def throughput(call: Callable[[], int], threads: int, seconds: float) -> float:
    """Samples per second of ``call`` (returns the samples it handled) run in a loop on ``threads`` threads.

    Every thread starts at the same barrier and stops issuing calls after ``seconds``; the time is
    from the barrier to the end of the last call.
    """
    counts = [0] * threads
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)

    def loop(index: int) -> None:
        try:
            barrier.wait()
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                counts[index] += call()
        except BaseException as exc:  # surfaced to the caller below
            errors.append(exc)

    workers = [threading.Thread(target=loop, args=(i,), name=f"bench-client-{i}") for i in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    started = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def stream_throughput(
    client: LetheClient, request: Callable[[], pb.PredictRequest], threads: int, seconds: float
) -> float:
    """Samples per second over ``threads`` PredictStream calls, each sending requests for ``seconds``."""
    counts = [0] * threads
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads + 1)

    def loop(index: int) -> None:
        try:
            barrier.wait()
            deadline = time.perf_counter() + seconds

            def requests() -> object:
                while time.perf_counter() < deadline:
                    yield request()

            for response in client.stub.PredictStream(requests(), metadata=client.metadata):
                counts[index] += len(from_tensor(response.outputs))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=loop, args=(i,), name=f"bench-stream-{i}") for i in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    started = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return sum(counts) / elapsed


def _measure_case(
    case: ModelCase, settings: PredictSettings, data_dir: Path, options: RunOptions
) -> list[tuple[int, list[float], list[float], list[float]]]:
    """Serve ``case``; return per thread count the (in-process, Predict, PredictStream) samples/s lists."""
    inputs, labels = _task_data(case)
    config = bench_config(
        data_dir,
        **{"model.backbone": case.backbone, "model.input_shape": ",".join(map(str, case.input_shape))},
    )
    measured: list[tuple[int, list[float], list[float], list[float]]] = []
    with lethe_server(config) as (app, client):
        task = "bench"
        client.wait(client.learn(task, inputs, labels, epochs=settings.epochs).id, timeout=900)
        batch = np.ascontiguousarray(inputs[: settings.batch])
        tensor = torch.from_numpy(batch)
        if app.worker is None:
            raise RuntimeError("the server has no worker")
        predictor = app.worker.strategy.predictor()  # the model Predict serves: same version, same weights
        served = app.worker.serving.predictor
        if served is None or served.version != predictor.version:
            raise RuntimeError("the published snapshot is not the strategy's current model")
        expected = predictor.predict(task, tensor).numpy()
        if not np.allclose(expected, client.predict(task, batch).outputs, atol=1e-5, equal_nan=True):
            raise RuntimeError("gRPC Predict and the in-process predictor disagree")

        def in_process() -> int:
            return len(predictor.predict(task, tensor))

        def unary() -> int:
            return len(client.predict(task, batch).classes)

        def request() -> pb.PredictRequest:
            return pb.PredictRequest(task=task, inputs=to_tensor(batch))

        warmup = min(0.2, settings.seconds)  # allocator, thread pools, first-call code paths
        throughput(in_process, 1, warmup)
        throughput(unary, 1, warmup)
        stream_throughput(client, request, 1, warmup)
        for threads in settings.threads:
            base: list[float] = []
            uni: list[float] = []
            stream: list[float] = []
            for r in range(settings.repeats):
                base.append(throughput(in_process, threads, settings.seconds))
                uni.append(throughput(unary, threads, settings.seconds))
                stream.append(stream_throughput(client, request, threads, settings.seconds))
                options.log(
                    f"  predict {case.name}, {threads} thread(s), {r + 1}/{settings.repeats}: in-process "
                    f"{base[-1]:.0f}, Predict {uni[-1]:.0f}, PredictStream {stream[-1]:.0f} samples/s"
                )
            measured.append((threads, base, uni, stream))
    return measured


def run(options: RunOptions) -> BenchmarkResult:
    """Run the predict benchmark; return its result."""
    settings = QUICK if options.quick else FULL
    result = BenchmarkResult(NAME, "Predict throughput")
    overhead_rows: list[list[str]] = []
    with Stopwatch() as total:
        for index, case in enumerate(settings.cases):
            for threads, base, uni, stream in _measure_case(
                case, settings, options.data_dir / f"predict-{index}", options
            ):
                label = f"{case.name} {list(case.input_shape)}, batch {settings.batch}, {threads} thread(s)"
                unary_row = compare(f"{label}: Predict", "samples/s", "in-process", base, uni, GOAL)
                result.comparisons.append(unary_row)
                result.comparisons.append(
                    compare(f"{label}: PredictStream", "samples/s", "in-process", base, stream, None)
                )
                if threads == 1:
                    model_ms = 1000 * settings.batch / unary_row.baseline.median
                    call_ms = 1000 * settings.batch / unary_row.lethe.median
                    overhead_rows.append([case.name, f"{model_ms:.3f}", f"{call_ms:.3f}", f"{call_ms - model_ms:.3f}"])
    result.tables.append(
        (
            f"Time per batch of {settings.batch}, one client thread (from the medians above)",
            ["model", "in-process forward (ms)", "Predict round trip (ms)", "serving overhead per call (ms)"],
            overhead_rows,
        )
    )
    result.settings = {
        "batch": str(settings.batch),
        "seconds per measurement": f"{settings.seconds:g}",
        "repetitions": str(settings.repeats),
        "learn before measuring": f"{settings.epochs} epoch(s)",
        "torch threads": str(torch.get_num_threads()),
        "client threads": "share one channel",
    }
    result.seconds = total.seconds
    return result
