"""Side by side with MLServer: the same digits MLP weights, the same protocol, the same clients.

``make bench ARGS="--only peer"`` (or ``python -m benchmarks.run --only peer``). On first run it
installs MLServer (:data:`MLSERVER_PINS`, with the torch version Lethe runs) into an environment of
its own under :data:`benchmarks.servers.CACHE_DIR` with ``uv``; later runs reuse it.

- **The model.** A Lethe server (``finetune``, the default ``mlp`` backbone, 2×256 on ``[1,8,8]``)
  learns the digits (all 10 classes, as one task named :data:`MODEL`). The state dict of the network
  it serves for that task, exported by Lethe itself (the Export RPC, safetensors), goes into a
  temporary MLServer model repository with a small custom runtime (:data:`RUNTIME`): a torch MLP
  with the same modules, so both servers run the same forward pass on the same weights; the
  benchmark checks that their logits agree on the same batch.
- **Servers**, each a subprocess of its own (:mod:`benchmarks.servers`), all running during the
  throughput measurements: Lethe with dynamic batching off (``server.max_batch_size=1``), on (the
  server's default, ``server.max_batch_size`` 1024 since 2026-12-06 and 64 before: no workload here
  puts more than 64 rows in a pass; no added delay) and on with ``server.max_batch_delay_ms=2``;
  MLServer at its defaults (one parallel inference worker, ``debug`` on) and at its best (``parallel_workers: 0``, i.e.
  inference in the server's own event loop, ``debug`` off), each without and with adaptive batching
  (``max_batch_size: 64``, ``max_batch_time: 0.002``).
- **Clients** run in a process of their own (``python -m benchmarks.bench_peer client``), never in a
  server's or the benchmark's: ``tritonclient.grpc`` ``infer`` (Open Inference Protocol ModelInfer,
  raw FP32 contents, outputs ``logits`` and ``classes``) against both servers, and Lethe's own
  ``Predict`` (:class:`client.LetheClient`) against Lethe. Threads share one channel.
- **Workloads**: 64 rows per call from 1 client thread; 1 row per call from 8 client threads. Each
  measurement runs for a fixed time after a warm-up; 5 repetitions, interleaved over every
  (server, protocol, workload), after a discarded warm-up round. Rows per second, median and range.
- **Time to ready**: process start to ready, 5 interleaved starts after a discarded one (which also
  fills the bytecode cache): Lethe at its defaults (``lethe serve --no-auth --data-dir DIR`` on a
  free port, fresh data directory) until ``grpc.health.v1`` reports ``lethe.v1.Lethe`` SERVING;
  MLServer at its defaults and with ``parallel_workers: 0`` until ``ModelReady`` of the model.
- **RSS**: resident memory of each server's whole process tree after the throughput runs.
- **Ceiling**: the same clients against a ``grpc.aio`` server that answers ModelInfer with a ready-made
  response and does nothing else (``python -m benchmarks.bench_peer ceiling``): no model, no
  validation, no batching. No Python gRPC server answers these clients faster on this machine, so
  it bounds what any ratio against MLServer can reach.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.report import BenchmarkResult, RunOptions, version_of
from benchmarks.servers import (
    CACHE_DIR,
    PROBE_CHANNEL_OPTIONS,
    ROOT,
    LetheServer,
    ServerProcess,
    free_port,
    server_env,
    start_lethe,
    stop_lethe,
)
from benchmarks.timing import Stopwatch, Summary, compare, interleaved

NAME = "peer"
#: The task Lethe learns and the model name on both servers (ModelInfer's model name is the task).
MODEL = "digits"
#: MLServer and the uvloop it needs: with uvloop 0.23 MLServer 1.7.1's inference worker crash-loops.
MLSERVER_PINS = ("mlserver==1.7.1", "uvloop==0.21.0")
#: The goals of the issue: against MLServer's best, at least parity everywhere, 2× at 1 row × 8 threads batched.
GOAL_PARITY = 1.0
GOAL_BATCHED_SMALL = 2.0

#: The custom MLServer runtime, written into the model repository: the same modules as Lethe's ``mlp``
#: backbone (``server.engine.backbones.MLP``: Flatten, then Linear+ReLU per hidden layer, then the head).
RUNTIME = textwrap.dedent(
    '''
    """Lethe's digits MLP as an MLServer runtime (written by benchmarks/bench_peer.py)."""

    import numpy as np
    import torch
    from mlserver import MLModel
    from mlserver.codecs import NumpyCodec
    from mlserver.types import InferenceRequest, InferenceResponse
    from mlserver.utils import get_model_uri
    from torch import nn


    class MLP(nn.Module):
        def __init__(self, state):
            super().__init__()
            hidden = sorted({int(k.split(".")[1]) for k in state if k.startswith("body.")})
            layers = [nn.Flatten()]
            for index in hidden:
                weight = state[f"body.{index}.weight"]
                layers += [nn.Linear(weight.shape[1], weight.shape[0]), nn.ReLU()]
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(state["head.weight"].shape[1], state["head.weight"].shape[0])
            self.load_state_dict(state)

        def forward(self, x):
            return self.head(self.body(x))


    class DigitsMLP(MLModel):
        async def load(self) -> bool:
            state = torch.load(await get_model_uri(self._settings), weights_only=True)
            self._net = MLP(state).eval()
            return True

        async def predict(self, payload: InferenceRequest) -> InferenceResponse:
            x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
            with torch.inference_mode():
                logits = self._net(torch.from_numpy(x)).numpy()
            return InferenceResponse(
                model_name=self.name,
                model_version=self.version,
                outputs=[
                    NumpyCodec.encode_output("logits", logits),
                    NumpyCodec.encode_output("classes", logits.argmax(axis=1).astype(np.int64)),
                ],
            )
    '''
)


@dataclass(frozen=True)
class PeerSettings:
    """The workload.

    Attributes:
        seconds: duration of one throughput measurement (after the client's own warm-up).
        repeats: interleaved repetitions of everything.
        ready_repeats: interleaved starts of each server for the time to ready.
        epochs: epochs of the digits learn.
        workloads: (rows per call, client threads).
    """

    seconds: float = 3.0
    repeats: int = 5
    ready_repeats: int = 5
    epochs: int = 5
    workloads: tuple[tuple[int, int], ...] = ((64, 1), (1, 8))


FULL = PeerSettings()
QUICK = PeerSettings(seconds=0.3, repeats=1, ready_repeats=1, epochs=1)


# --------------------------------------------------------------------------------- MLServer side


def mlserver_venv() -> Path:
    """Where MLServer's environment lives."""
    return CACHE_DIR / "mlserver-venv"


def _uv() -> list[str]:
    """The ``uv`` command: next to this interpreter (``make`` installs it there), else on the PATH."""
    beside = Path(sys.executable).parent / "uv"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("uv")
    if found:
        return [found]
    return [sys.executable, "-m", "uv"]


def ensure_mlserver(log: Callable[[str], None]) -> Path:
    """MLServer's environment, installed on first use; return its ``bin`` directory.

    Installs :data:`MLSERVER_PINS` and the torch version this interpreter runs (so both servers run
    the same kernels) with ``uv``; a stamp file names what was installed, and a different set of
    pins reinstalls.
    """
    venv = mlserver_venv()
    pins = [*MLSERVER_PINS, f"torch=={version_of('torch').split('+')[0]}"]
    stamp = venv / ".lethe-bench-pins"
    if stamp.exists() and stamp.read_text().split() == pins:
        return venv / "bin"
    log(f"peer: installing {' '.join(pins)} into {venv} (first run) ...")
    subprocess.run([*_uv(), "venv", "--quiet", "--clear", "--python", sys.executable, str(venv)], check=True)
    subprocess.run([*_uv(), "pip", "install", "--quiet", "--python", str(venv / "bin" / "python"), *pins], check=True)
    stamp.write_text("\n".join(pins) + "\n")
    return venv / "bin"


@dataclass(frozen=True)
class MLServerConfig:
    """One MLServer configuration.

    Attributes:
        label: as shown in the tables.
        parallel_workers: None = MLServer's default (1 inference worker process).
        debug: MLServer's ``debug`` (its default True logs every request).
        batching: adaptive batching (``max_batch_size`` 64, ``max_batch_time`` 2 ms).
    """

    label: str
    parallel_workers: int | None
    debug: bool
    batching: bool


MLSERVER_CONFIGS = (
    MLServerConfig("MLServer default", None, True, False),
    MLServerConfig("MLServer default, adaptive batching", None, True, True),
    MLServerConfig("MLServer best (parallel_workers 0)", 0, False, False),
    MLServerConfig("MLServer best (parallel_workers 0), adaptive batching", 0, False, True),
)


def write_repository(root: Path, weights: Path, config: MLServerConfig, grpc_port: int) -> Path:
    """A model repository for ``config`` (settings, model settings, runtime, weights) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "http_port": free_port(),
        "grpc_port": grpc_port,
        "metrics_port": free_port(),
        "debug": config.debug,
        "metrics_dir": str(root / ".metrics"),
        "environments_dir": str(root / ".envs"),
    }
    if config.parallel_workers is not None:
        settings["parallel_workers"] = config.parallel_workers
    model_dir = root / MODEL
    model_dir.mkdir(exist_ok=True)
    model: dict[str, Any] = {
        "name": MODEL,
        "implementation": "digits_runtime.DigitsMLP",
        "parameters": {"uri": str(weights), "version": "1"},
    }
    if config.batching:
        model |= {"max_batch_size": 64, "max_batch_time": 0.002}
    (root / "settings.json").write_text(json.dumps(settings, indent=1))
    (model_dir / "model-settings.json").write_text(json.dumps(model, indent=1))
    (model_dir / "digits_runtime.py").write_text(RUNTIME)
    return root


def oip_model_ready(target: str, model: str = MODEL) -> Callable[[], bool]:
    """A readiness probe: the Open Inference Protocol's ``ModelReady`` of ``model`` at ``target`` is true."""
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(target, channel_args=PROBE_CHANNEL_OPTIONS)

    def ready() -> bool:
        try:
            return bool(client.is_model_ready(model))
        except Exception:  # connection refused, UNAVAILABLE while loading: not ready yet
            return False

    return ready


def start_mlserver(
    bin_dir: Path, root: Path, weights: Path, config: MLServerConfig, log: Path
) -> tuple[ServerProcess, str]:
    """``mlserver start`` of a fresh repository for ``config``; the process and its gRPC target."""
    port = free_port()
    repository = write_repository(root, weights, config, port)
    target = f"127.0.0.1:{port}"
    env = server_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}, pythonpath=())
    env.pop("PYTHONPATH", None)
    server = ServerProcess(
        [str(bin_dir / "mlserver"), "start", str(repository)], oip_model_ready(target), log, env=env, cwd=root
    )
    return server, target


# ------------------------------------------------------------------------------------ Lethe side


#: Lethe configurations of the throughput runs: label → settings over the benchmark's base.
LETHE_CONFIGS: dict[str, dict[str, Any]] = {
    "Lethe, batching off": {"server.max_batch_size": 1},
    "Lethe, batching on": {},
    "Lethe, batching on, 2 ms delay": {"server.max_batch_delay_ms": 2},
}
#: Every Lethe server of the peer benchmark: finetune on the CPU, the metrics endpoint on (a free port), as MLServer's.
LETHE_BASE = {"model.strategy": "finetune", "model.device": "cpu", "server.metrics_port": 0}


def export_weights(lethe: LetheServer, task: str, out: Path) -> Path:
    """The state dict of the network Lethe serves for ``task``, through its Export RPC, saved for torch.load.

    Lethe exports safetensors (its ``lethe export --format safetensors``); the runtime loads a plain
    ``torch.save`` file, so MLServer's environment needs nothing but torch.
    """
    import torch
    from safetensors.torch import load_file

    exported = lethe.client.export(task, "safetensors", out.with_suffix(".safetensors"))
    torch.save(load_file(str(exported.path)), out)
    return out


def digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits: inputs ``[n,1,8,8]`` float32, labels int64."""
    from client.datasets import load_digits

    data = load_digits()
    return data.inputs.astype(np.float32), data.labels.astype(np.int64)


# ------------------------------------------------------------------------------------ the ceiling

#: Label of the ceiling server in the tables.
CEILING = "ceiling: grpc.aio, ready-made answer, no model"


def serve_ceiling(port: int, num_classes: int = 10) -> None:
    """The ceiling server (see the module doc) until SIGTERM: ModelReady and ModelInfer only."""
    import asyncio
    import signal

    import grpc
    from grpc import aio

    from protos import inference as oip

    answers: dict[int, bytes] = {}

    def answer(rows: int) -> bytes:
        if rows not in answers:
            logits = np.zeros((rows, num_classes), dtype=np.float32)
            response = oip.ModelInferResponse(model_name=MODEL, model_version="1")
            for name, datatype, array in (
                ("logits", "FP32", logits),
                ("classes", "INT64", np.zeros(rows, dtype=np.int64)),
            ):
                response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
                response.raw_output_contents.append(array.tobytes())
            answers[rows] = response.SerializeToString()
        return answers[rows]

    async def infer(request: Any, context: aio.ServicerContext) -> bytes:
        return answer(int(request.inputs[0].shape[0]) if request.inputs and request.inputs[0].shape else 1)

    async def ready(request: Any, context: aio.ServicerContext) -> Any:
        return oip.ModelReadyResponse(ready=True)

    handlers = {
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            infer, request_deserializer=oip.ModelInferRequest.FromString, response_serializer=lambda b: b
        ),
        "ModelReady": grpc.unary_unary_rpc_method_handler(
            ready,
            request_deserializer=oip.ModelReadyRequest.FromString,
            response_serializer=oip.ModelReadyResponse.SerializeToString,
        ),
    }

    async def serve() -> None:
        server = aio.server(handlers=[grpc.method_handlers_generic_handler(oip.SERVICE_NAME, handlers)])
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(1)

    asyncio.run(serve())


@contextlib.contextmanager
def _ceiling_server(root: Path) -> Iterator[str]:
    port = free_port()
    target = f"127.0.0.1:{port}"
    argv = [sys.executable, "-m", "benchmarks.bench_peer", "ceiling", "--port", str(port)]
    with ServerProcess(argv, oip_model_ready(target), root / "ceiling.log"):
        yield target


# ---------------------------------------------------------------------------------- the clients


@dataclass(frozen=True)
class Target:
    """Something a client process measures: a server, a protocol, a model."""

    server: str
    address: str
    protocol: str  # "oip" or "predict"


def client_main(spec: Mapping[str, Any]) -> dict[str, float]:
    """The client process: call ``spec``'s target in a loop; rows per second.

    ``spec``: ``address``, ``protocol`` (``oip`` | ``predict``), ``model``, ``inputs`` (a ``.npy``
    file), ``rows`` per call, ``threads``, ``seconds``, ``warmup`` seconds.
    """
    from benchmarks.timing import ClientThreads, cpu_usage

    inputs = np.load(spec["inputs"])
    batch = np.ascontiguousarray(inputs[: spec["rows"]])
    threads, seconds = int(spec["threads"]), float(spec["seconds"])
    call: Callable[[], int]
    if spec["protocol"] == "oip":
        import tritonclient.grpc as triton

        oip = triton.InferenceServerClient(spec["address"])
        outputs = [triton.InferRequestedOutput("logits"), triton.InferRequestedOutput("classes")]

        def call() -> int:
            request = triton.InferInput("input", list(batch.shape), "FP32")
            request.set_data_from_numpy(batch)
            result = oip.infer(spec["model"], [request], outputs=outputs)
            return len(result.as_numpy("classes"))

    else:
        from client import LetheClient

        lethe = LetheClient(spec["address"], retries=1, timeout=60)

        def call() -> int:
            return len(lethe.predict(spec["model"], batch).classes)

    with ClientThreads(threads) as pool:
        pool.throughput(call, threads, float(spec["warmup"]))
        before = cpu_usage(spec.get("servers", ()))
        rate = pool.throughput(call, threads, seconds)
        after = cpu_usage(spec.get("servers", ()))
    return {"rows_per_second": rate, **{key: after[key] - before[key] for key in before}}


def measure(target: Target, inputs: Path, rows: int, threads: int, seconds: float) -> float:
    """Rows per second of a client process against ``target``."""
    return measure_usage(target, inputs, rows, threads, seconds)["rows_per_second"]


def measure_usage(
    target: Target, inputs: Path, rows: int, threads: int, seconds: float, servers: Sequence[int] = ()
) -> dict[str, float]:
    """:func:`measure` with the CPU seconds of its timed window (:func:`~benchmarks.timing.cpu_usage`)."""
    spec = {
        "address": target.address,
        "protocol": target.protocol,
        "model": MODEL,
        "inputs": str(inputs),
        "rows": rows,
        "threads": threads,
        "seconds": seconds,
        "warmup": min(1.0, seconds),
        "servers": list(servers),
    }
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_peer", "client", json.dumps(spec)],
        cwd=ROOT,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=120 + 2 * seconds,
    )
    if done.returncode != 0:
        raise RuntimeError(f"client against {target.server} ({target.protocol}) failed:\n{done.stderr[-3000:]}")
    return {key: float(value) for key, value in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def oip_logits(address: str, batch: np.ndarray) -> np.ndarray | None:
    """``logits`` of ModelInfer at ``address``; None when the server has no Open Inference Protocol."""
    import grpc
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(address)
    request = triton.InferInput("input", list(batch.shape), "FP32")
    request.set_data_from_numpy(batch)
    try:
        result = client.infer(MODEL, [request], outputs=[triton.InferRequestedOutput("logits")])
    except triton.InferenceServerException as error:
        if str(error.status()) == str(grpc.StatusCode.UNIMPLEMENTED) or "UNIMPLEMENTED" in str(error):
            return None
        raise
    finally:
        client.close()
    logits: np.ndarray = result.as_numpy("logits")
    return logits


# ------------------------------------------------------------------------------------ the run


@dataclass
class PeerMeasurements:
    """Everything measured."""

    rates: dict[str, list[float]] = field(default_factory=dict)
    ready: dict[str, list[float]] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)
    max_logit_difference: float = 0.0
    lethe_oip: bool = False


def _key(server: str, protocol: str, rows: int, threads: int) -> str:
    return f"{server} | {protocol} | {rows}x{threads}"


@contextlib.contextmanager
def _lethe_servers(root: Path, data: Path, options: RunOptions) -> Iterator[dict[str, LetheServer]]:
    """Every Lethe configuration, started on copies of the data directory that learned the digits."""
    running: dict[str, LetheServer] = {}
    try:
        for index, (label, settings) in enumerate(LETHE_CONFIGS.items()):
            copy = root / f"lethe-{index}"
            shutil.copytree(data, copy / "data")
            running[label] = start_lethe(copy / "data", settings, base=LETHE_BASE)
            options.log(f"  {label}: ready in {running[label].server.ready_seconds:.1f} s at {running[label].target}")
        yield running
    finally:
        for server in running.values():
            stop_lethe(server)


@contextlib.contextmanager
def _mlservers(
    bin_dir: Path, root: Path, weights: Path, options: RunOptions
) -> Iterator[dict[str, tuple[ServerProcess, str]]]:
    running: dict[str, tuple[ServerProcess, str]] = {}
    try:
        for index, config in enumerate(MLSERVER_CONFIGS):
            where = root / f"mlserver-{index}"
            running[config.label] = start_mlserver(bin_dir, where, weights, config, root / f"mlserver-{index}.log")
            options.log(f"  {config.label}: ready in {running[config.label][0].ready_seconds:.1f} s")
        yield running
    finally:
        for server, _target in running.values():
            server.stop()


def time_to_ready(
    bin_dir: Path, root: Path, weights: Path, settings: PeerSettings, options: RunOptions
) -> dict[str, list[float]]:
    """Seconds from process start to ready, interleaved starts of each server (see the module doc)."""
    counter = iter(range(10_000))

    def lethe() -> float:
        index = next(counter)
        running = start_lethe(root / f"ready-lethe-{index}" / "data", {"server.metrics_port": free_port()}, base={})
        stop_lethe(running)
        return running.server.ready_seconds

    def mlserver(config: MLServerConfig) -> Callable[[], float]:
        def start() -> float:
            index = next(counter)
            server, _ = start_mlserver(
                bin_dir, root / f"ready-ml-{index}", weights, config, root / f"ready-ml-{index}.log"
            )
            server.stop()
            return server.ready_seconds

        return start

    variants = {
        "Lethe defaults (uncle, mlp; fresh data directory)": lethe,
        MLSERVER_CONFIGS[0].label: mlserver(MLSERVER_CONFIGS[0]),
        MLSERVER_CONFIGS[2].label: mlserver(MLSERVER_CONFIGS[2]),
    }
    return interleaved(
        variants,
        settings.ready_repeats,
        log=lambda r, x: options.log(f"  ready {r}: " + ", ".join(f"{k} {v:.2f} s" for k, v in x.items())),
    )


def measure_all(settings: PeerSettings, options: RunOptions) -> PeerMeasurements:
    """Install MLServer if needed, learn the digits on Lethe, then measure (see the module doc)."""
    bin_dir = ensure_mlserver(options.log)
    measured = PeerMeasurements()
    root = Path(tempfile.mkdtemp(prefix="peer-", dir=options.data_dir))
    try:
        inputs, labels = digits()
        inputs_file = root / "inputs.npy"
        np.save(inputs_file, inputs[:64])
        learned = start_lethe(root / "learn" / "data", {}, base=LETHE_BASE)
        try:
            learned.client.wait(learned.client.learn(MODEL, inputs, labels, epochs=settings.epochs).id, timeout=900)
            reference = learned.client.predict(MODEL, inputs[:64]).outputs
            weights = export_weights(learned, MODEL, root / "weights.pt")
        finally:
            stop_lethe(learned)

        with (
            _lethe_servers(root, root / "learn" / "data", options) as lethes,
            _mlservers(bin_dir, root, weights, options) as mls,
            _ceiling_server(root) as ceiling,
        ):
            differences = []
            for label, (_server, target) in mls.items():
                logits = oip_logits(target, inputs[:64])
                if logits is None:
                    raise RuntimeError(f"{label} does not answer ModelInfer")
                differences.append(float(np.max(np.abs(logits - reference))))
            any_lethe = next(iter(lethes.values()))
            lethe_logits = oip_logits(any_lethe.target, inputs[:64])
            measured.lethe_oip = lethe_logits is not None
            if lethe_logits is not None:
                differences.append(float(np.max(np.abs(lethe_logits - reference))))
            measured.max_logit_difference = max(differences)
            if measured.max_logit_difference > 1e-4:
                raise RuntimeError(
                    f"Lethe and MLServer disagree: logits differ by up to {measured.max_logit_difference}"
                )
            options.log(f"  logits agree (max difference {measured.max_logit_difference:.2g})")

            targets = [
                Target(label, server.target, protocol)
                for label, server in lethes.items()
                for protocol in (("oip", "predict") if measured.lethe_oip else ("predict",))
            ]
            targets += [Target(label, target, "oip") for label, (_server, target) in mls.items()]
            targets.append(Target(CEILING, ceiling, "oip"))
            variants: dict[str, Callable[[], float]] = {}
            for rows, threads in settings.workloads:
                for peer_target in targets:
                    key = _key(peer_target.server, peer_target.protocol, rows, threads)
                    variants[key] = partial(measure, peer_target, inputs_file, rows, threads, settings.seconds)
            measured.rates = interleaved(
                variants,
                settings.repeats,
                log=lambda r, x: options.log(
                    f"  repetition {r}/{settings.repeats}: " + "; ".join(f"{k} {v:,.0f}" for k, v in x.items())
                ),
            )
            for label, lethe in lethes.items():
                measured.rss[label] = lethe.server.rss_bytes()
            for label, (process, _target) in mls.items():
                measured.rss[label] = process.rss_bytes()
        measured.ready = time_to_ready(bin_dir, root, weights, settings, options)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return measured


def run(options: RunOptions, settings: PeerSettings | None = None) -> BenchmarkResult:
    """The peer benchmark (see the module doc)."""
    settings = settings or (QUICK if options.quick else FULL)
    result = BenchmarkResult(NAME, "Side by side with MLServer (digits MLP, Open Inference Protocol)")
    with Stopwatch() as total:
        m = measure_all(settings, options)
    protocols = (("oip", "ModelInfer"), ("predict", "Predict")) if m.lethe_oip else (("predict", "Predict"),)
    pairs = (
        ("Lethe, batching off", "MLServer default", "MLServer best (parallel_workers 0)", False),
        (
            "Lethe, batching on",
            "MLServer default, adaptive batching",
            "MLServer best (parallel_workers 0), adaptive batching",
            True,
        ),
        (
            "Lethe, batching on, 2 ms delay",
            "MLServer default, adaptive batching",
            "MLServer best (parallel_workers 0), adaptive batching",
            True,
        ),
    )
    for rows, threads in settings.workloads:
        for lethe, default, best, batched in pairs:
            for protocol, protocol_name in protocols:
                ours = m.rates[_key(lethe, protocol, rows, threads)]
                for peer, goal in (
                    (default, None),
                    (best, GOAL_BATCHED_SMALL if batched and rows == 1 else GOAL_PARITY),
                ):
                    theirs = m.rates[_key(peer, "oip", rows, threads)]
                    result.comparisons.append(
                        compare(
                            f"{rows} row(s) × {threads} thread(s): {lethe}, {protocol_name}",
                            "rows/s",
                            f"{peer}, ModelInfer",
                            theirs,
                            ours,
                            goal,
                        )
                    )
    for rows, threads in settings.workloads:
        for protocol, protocol_name in protocols:
            ours = _best_per_repetition(m.rates, LETHE_CONFIGS, protocol, rows, threads)
            theirs = _best_per_repetition(m.rates, [c.label for c in MLSERVER_CONFIGS], "oip", rows, threads)
            result.comparisons.append(
                compare(
                    f"{rows} row(s) × {threads} thread(s): Lethe's best configuration, {protocol_name}",
                    "rows/s",
                    "MLServer's best configuration, ModelInfer",
                    theirs,
                    ours,
                    GOAL_PARITY,
                )
            )
    best_peer = [c.label for c in MLSERVER_CONFIGS]
    ceiling_rows = []
    for rows, threads in settings.workloads:
        ceiling = Summary.of(m.rates[_key(CEILING, "oip", rows, threads)])
        their_best = Summary.of(_best_per_repetition(m.rates, best_peer, "oip", rows, threads))
        ceiling_rows.append(
            [f"{rows} row(s) × {threads} thread(s)", ceiling.format(0), f"{ceiling.median / their_best.median:.2f}×"]
        )
    result.tables.append(
        (
            "The ceiling: these clients against a grpc.aio server that does nothing but answer (rows/s)",
            ["workload", "ceiling, ModelInfer", "ceiling ÷ MLServer's best"],
            ceiling_rows,
        )
    )
    ready_rows = [[name, Summary.of(values).format(2)] for name, values in m.ready.items()]
    result.tables.append(
        ("Time to ready (s): process start to ready, median (range)", ["server", "seconds"], ready_rows)
    )
    lethe_ready = Summary.of(next(iter(m.ready.values()))).median
    for name, values in list(m.ready.items())[1:]:
        result.notes.append(
            f"time to ready, Lethe ÷ {name}: {lethe_ready / Summary.of(values).median:.2f} (goal ≤ 1.5)"
        )
    rss_rows = [[name, f"{value / 2**20:,.0f}"] for name, value in m.rss.items()]
    result.tables.append(
        ("Resident memory after the throughput runs (MiB, whole process tree)", ["server", "RSS"], rss_rows)
    )
    result.settings = {
        "model": "finetune, mlp 2×256 on [1,8,8], all 10 digits as one task",
        "seconds per measurement": f"{settings.seconds:g} (after a 1 s client warm-up)",
        "repetitions": str(settings.repeats),
        "MLServer": version_of_mlserver(),
        "clients": "one process per measurement, threads share one channel; tritonclient " + version_of("tritonclient"),
        "logits": f"identical within {m.max_logit_difference:.2g}",
    }
    if not m.lethe_oip:
        result.notes.append("Lethe answered ModelInfer with UNIMPLEMENTED: only its Predict was measured.")
    result.seconds = total.seconds
    return result


def _best_per_repetition(
    rates: Mapping[str, list[float]], servers: Iterable[str], protocol: str, rows: int, threads: int
) -> list[float]:
    """Repetition by repetition, the highest rate of any of ``servers`` on this workload."""
    series = [rates[_key(server, protocol, rows, threads)] for server in servers]
    return [max(values) for values in zip(*series, strict=True)]


def version_of_mlserver() -> str:
    """MLServer's version in its environment, with uvloop's and torch's."""
    python = mlserver_venv() / "bin" / "python"
    if not python.exists():
        return "not installed"
    script = (
        "import importlib.metadata as m; "
        "print(', '.join(f'{p} {m.version(p)}' for p in ('mlserver', 'uvloop', 'torch')))"
    )
    return subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=True).stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.bench_peer client SPEC`` (one measurement's client process) or ``ceiling --port P``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_peer")
    sub = parser.add_subparsers(dest="command", required=True)
    client = sub.add_parser("client", help="one measurement (used by the benchmark)")
    client.add_argument("spec", help="JSON: address, protocol, model, inputs, rows, threads, seconds, warmup")
    ceiling = sub.add_parser("ceiling", help="the ceiling server (used by the benchmark)")
    ceiling.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "ceiling":
        serve_ceiling(args.port)
        return 0
    print(json.dumps(client_main(json.loads(args.spec))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
