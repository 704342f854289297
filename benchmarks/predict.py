"""Predict throughput: batches of 64 through gRPC against calling the same model in-process.

- **baseline**: the same model called in this process: the server's latest checkpoint loaded
  into a strategy built from the same configuration, ``strategy.predictor().predict(task,
  tensor)`` on a ready-made ``torch.Tensor`` (checked to be the version Predict serves and to give
  the same logits): exactly the model Predict serves, with none of the serving path;
- **Predict**: :meth:`LetheClient.predict` (numpy in, numpy out), one unary call per batch;
- **PredictStream**: one bidirectional stream per client thread, one request per batch;
- **bare gRPC echo** (reference): the same client call against a minimal grpcio server whose
  Predict parses the request and returns a ready-made response of the same size, with no model
  and no validation: the floor any Python gRPC server pays per call on this machine.

The servers run in child processes, as they are deployed; the clients and the in-process
baseline run in the benchmark's process. Each is measured with 1 and 4 concurrent client threads
(one shared channel), for two models: the digits MLP (``[1,8,8]``, so small that per-call
overhead dominates) and a CNN on CIFAR-shaped ``[3,32,32]`` inputs (where the forward pass
costs tens of milliseconds). The variants run interleaved, repetition by repetition.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from benchmarks.report import BenchmarkResult, RunOptions
from benchmarks.servers import BASE_SETTINGS, bare_server, lethe_server
from benchmarks.timing import ClientThreads, Stopwatch, compare, interleaved
from client import LetheClient
from client.datasets import load_digits
from protos import lethe_pb2 as pb
from protos.tensors import from_tensor, to_tensor
from server.app import App
from server.checkpoints import CheckpointStore
from server.config import Config, ServerSection, load_config
from server.data.blobs import FileBlobStore
from server.engine.protocol import Predictor

NAME = "predict"
#: The issue's goal: gRPC Predict at least 80% of in-process throughput.
GOAL = 0.8
TASK = "bench"


@dataclass(frozen=True)
class ModelCase:
    """One model to serve.

    Attributes:
        name: short label for the table.
        backbone: the backbone name.
        input_shape: shape of one sample.
        learn_samples: random samples of the task learned before measuring (ignored for digits).
        digits: learn and predict sklearn's digits instead of random inputs.
    """

    name: str
    backbone: str
    input_shape: tuple[int, ...]
    learn_samples: int = 512
    digits: bool = False


@dataclass(frozen=True)
class PredictSettings:
    """The workload.

    Attributes:
        batch: samples per request.
        threads: concurrent client threads to measure.
        seconds: duration of one measurement.
        repeats: measurements of each variant (interleaved).
        cases: the models.
        epochs: epochs of the learn job that precedes the measurements.
    """

    batch: int = 64
    threads: tuple[int, ...] = (1, 4)
    seconds: float = 1.5
    repeats: int = 7
    cases: tuple[ModelCase, ...] = (
        ModelCase("digits, mlp", "mlp", (1, 8, 8), digits=True),
        ModelCase("CIFAR-shaped, cnn", "cnn", (3, 32, 32), learn_samples=512),
    )
    epochs: int = 2


FULL = PredictSettings()
QUICK = PredictSettings(
    seconds=0.05,
    repeats=1,
    cases=(
        ModelCase("digits, mlp", "mlp", (1, 8, 8), digits=True),
        ModelCase("CIFAR-shaped, cnn", "cnn", (3, 32, 32), learn_samples=64),
    ),
    epochs=1,
)

#: The measured variants, in the order they run within a repetition.
VARIANTS = ("in-process", "Predict", "PredictStream", "bare gRPC echo")


@dataclass
class CaseMeasurements:
    """Samples/s of every variant, per client-thread count: ``rates[threads][variant]`` lists repetitions."""

    rates: dict[int, dict[str, list[float]]] = field(default_factory=dict)


def _task_data(case: ModelCase, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    if case.digits:
        data = load_digits()
        return data.inputs.astype(np.float32), data.labels.astype(np.int64)
    rng = np.random.default_rng(seed)
    inputs = rng.random((case.learn_samples, *case.input_shape), dtype=np.float32)
    return inputs, rng.integers(0, 10, size=case.learn_samples, dtype=np.int64)


def stream_throughput(
    pool: ClientThreads, client: LetheClient, request: Callable[[], pb.PredictRequest], threads: int, seconds: float
) -> float:
    """Samples per second over ``threads`` PredictStream calls, each sending requests for ``seconds``."""

    def body(deadline: float) -> int:
        def requests() -> Iterator[pb.PredictRequest]:
            while time.perf_counter() < deadline:
                yield request()

        samples = 0
        for response in client.stub.PredictStream(requests(), metadata=client.metadata):
            samples += len(from_tensor(response.outputs))
        return samples

    return pool.run(body, threads, seconds)


def echo_handlers(batch: int, num_classes: int) -> dict[str, grpc.RpcMethodHandler]:
    """``Predict`` that parses the request, touches its bytes and returns a ready-made response of the right size."""
    response = pb.PredictResponse(
        outputs=to_tensor(np.zeros((batch, num_classes), dtype=np.float32)), classes=[0] * batch, model_version=1
    )

    def predict(request: pb.PredictRequest, context: grpc.ServicerContext) -> pb.PredictResponse:
        len(request.inputs.data)
        return response

    return {
        "Predict": grpc.unary_unary_rpc_method_handler(
            predict,
            request_deserializer=pb.PredictRequest.FromString,
            response_serializer=pb.PredictResponse.SerializeToString,
        )
    }


def server_settings(case: ModelCase) -> dict[str, Any]:
    """The settings of the server of ``case`` (over :data:`BASE_SETTINGS`)."""
    return {"model.backbone": case.backbone, "model.input_shape": ",".join(map(str, case.input_shape))}


def served_model(config: Config) -> Predictor:
    """The model the server of ``config`` serves, loaded in this process from its latest checkpoint."""
    checkpoint = CheckpointStore(FileBlobStore(Path(config.storage.data_dir).resolve())).load_latest()
    if checkpoint is None:
        raise RuntimeError("the server wrote no checkpoint")
    strategy = App(config).build_strategy()
    strategy.load_state_dict(checkpoint.strategy_state)
    return strategy.predictor()


def measure_case(case: ModelCase, settings: PredictSettings, data_dir: Path, options: RunOptions) -> CaseMeasurements:
    """Learn a task on a fresh server for ``case``, then measure every variant at every thread count."""
    inputs, labels = _task_data(case)
    overrides = server_settings(case)
    config = load_config(env={}, overrides={**BASE_SETTINGS, **overrides, "storage.data_dir": str(data_dir)})
    measured = CaseMeasurements()
    section = ServerSection()
    with (
        ClientThreads(max(settings.threads)) as pool,
        lethe_server(data_dir, overrides) as lethe,
        bare_server(
            "benchmarks.predict:echo_handlers",
            [settings.batch, config.model.num_classes],
            threads=section.threads,
            max_message_bytes=section.max_message_bytes,
        ) as echo,
    ):
        client = lethe.client
        client.wait(client.learn(TASK, inputs, labels, epochs=settings.epochs).id, timeout=900)
        batch = np.ascontiguousarray(inputs[: settings.batch])
        tensor = torch.from_numpy(batch)
        predictor = served_model(config)
        served = client.predict(TASK, batch)
        if served.model_version != predictor.version:
            raise RuntimeError(f"the server serves version {served.model_version}, its checkpoint {predictor.version}")
        if not np.allclose(predictor.predict(TASK, tensor).numpy(), served.outputs, atol=1e-5):
            raise RuntimeError("gRPC Predict and the in-process predictor disagree")

        def request() -> pb.PredictRequest:
            return pb.PredictRequest(task=TASK, inputs=to_tensor(batch))

        calls: dict[str, Callable[[], int]] = {
            "in-process": lambda: len(predictor.predict(TASK, tensor)),
            "Predict": lambda: len(client.predict(TASK, batch).classes),
            "bare gRPC echo": lambda: len(echo.predict(TASK, batch).classes),
        }
        for threads in settings.threads:

            def variant(name: str, threads: int = threads) -> Callable[[], float]:
                if name == "PredictStream":
                    return lambda: stream_throughput(pool, client, request, threads, settings.seconds)
                return lambda: pool.throughput(calls[name], threads, settings.seconds)

            def log(repetition: int, rates: dict[str, float], threads: int = threads) -> None:
                options.log(
                    f"  predict {case.name}, {threads} thread(s), {repetition}/{settings.repeats}: "
                    + ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items())
                    + " samples/s"
                )

            variants = {name: variant(name) for name in VARIANTS}
            measured.rates[threads] = interleaved(variants, settings.repeats, log=log)
    return measured


def _own_work(ms: float) -> str:
    """The "Lethe's own work" cell; a negative difference means it is below the measurement noise."""
    return f"{ms:.3f}" if ms >= 0 else f"below the noise ({ms:.3f})"


def run(options: RunOptions) -> BenchmarkResult:
    """Run the predict benchmark; return its result."""
    settings = QUICK if options.quick else FULL
    result = BenchmarkResult(NAME, "Predict throughput")
    per_call: list[list[str]] = []
    floor_rows: list[list[str]] = []
    with Stopwatch() as total:
        for index, case in enumerate(settings.cases):
            measured = measure_case(case, settings, options.data_dir / f"predict-{index}", options)
            for threads, rates in measured.rates.items():
                label = f"{case.name} {list(case.input_shape)}, batch {settings.batch}, {threads} thread(s)"
                base = rates["in-process"]
                unary = compare(f"{label}: Predict", "samples/s", "in-process", base, rates["Predict"], GOAL)
                result.comparisons.append(unary)
                result.comparisons.append(
                    compare(f"{label}: PredictStream", "samples/s", "in-process", base, rates["PredictStream"])
                )
                echo = statistics.median(rates["bare gRPC echo"])
                request_kb = 4 * settings.batch * int(np.prod(case.input_shape)) / 1000
                floor_rows.append(
                    [
                        case.name,
                        f"{request_kb:,.0f} kB",
                        str(threads),
                        f"{echo:,.0f}",
                        f"{1000 * settings.batch / echo:.3f}",
                    ]
                )
                if threads == 1:
                    forward_ms = 1000 * settings.batch / unary.baseline.median
                    unary_ms = 1000 * settings.batch / unary.lethe.median
                    echo_ms = 1000 * settings.batch / echo
                    per_call.append(
                        [
                            case.name,
                            f"{forward_ms:.3f}",
                            f"{unary_ms:.3f}",
                            f"{echo_ms:.3f}",
                            _own_work(unary_ms - forward_ms - echo_ms),
                            f"{100 * forward_ms / (forward_ms + echo_ms):.0f}%",
                        ]
                    )
    result.tables.append(
        (
            f"Bare gRPC echo (reference): the same client call, no model, no validation, batch {settings.batch}",
            ["model", "request inputs", "client threads", "samples/s (median)", "ms per call"],
            floor_rows,
        )
    )
    result.tables.append(
        (
            f"Where a Predict's time goes: one client thread, batch {settings.batch}, from the medians above",
            [
                "model",
                "in-process forward (ms)",
                "Predict round trip (ms)",
                "bare gRPC echo round trip (ms)",
                "Lethe's own work = round trip − forward − echo (ms)",
                "best possible ratio if Lethe's own work were free",
            ],
            per_call,
        )
    )
    result.settings = {
        "batch": str(settings.batch),
        "seconds per measurement": f"{settings.seconds:g}",
        "repetitions": str(settings.repeats),
        "learn before measuring": f"{settings.epochs} epoch(s) of finetune",
        "torch threads": str(torch.get_num_threads()),
        "client threads": "share one channel, long-lived (same threads for every variant)",
    }
    result.seconds = total.seconds
    return result
