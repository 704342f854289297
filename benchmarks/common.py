"""Shared pieces of the benchmarks: statistics, result tables, machine facts and servers in child processes.

Every benchmark measures Lethe and its baseline *in the same run*, interleaved repetition by
repetition (baseline, Lethe, baseline, Lethe, ...), so that a burst of load from other processes
hits both sides alike. Results are medians; the ratio of a row is the median of the per-repetition
ratios (Lethe / baseline of the same repetition), which cancels slow drifts of the machine's load.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import grpc

from client import LetheClient
from protos import lethe_pb2 as pb
from server.app import App
from server.config import Config, load_config

#: Settings every benchmark server starts from: CPU, no auth, no metrics endpoint, port 0.
BASE_SETTINGS: dict[str, Any] = {
    "model.strategy": "finetune",
    "model.device": "cpu",
    "server.host": "127.0.0.1",
    "server.port": 0,
    "server.metrics_port": -1,
    "auth.enabled": False,
}


@dataclass(frozen=True)
class Summary:
    """Median and range of repeated measurements of one quantity."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        """Summarize ``values`` (at least one)."""
        if not values:
            raise ValueError("nothing to summarize: no measurements")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def format(self, digits: int = 1) -> str:
        """``median`` alone for one measurement, else ``median (low–high)``."""
        if self.count == 1:
            return f"{self.median:,.{digits}f}"
        return f"{self.median:,.{digits}f} ({self.low:,.{digits}f}–{self.high:,.{digits}f})"


@dataclass(frozen=True)
class Comparison:
    """One row of a results table: Lethe against its baseline on the same workload.

    Attributes:
        case: what was measured (workload and variant), as shown in the table.
        unit: unit of both values, e.g. ``"MB/s"``.
        baseline_name: what the baseline is, e.g. ``"bare gRPC echo"``.
        baseline: the baseline's measurements.
        lethe: Lethe's measurements.
        ratio: per-repetition ratios Lethe / baseline.
        goal: the smallest acceptable ratio, or None when the row is informative only.
    """

    case: str
    unit: str
    baseline_name: str
    baseline: Summary
    lethe: Summary
    ratio: Summary
    goal: float | None = None

    @property
    def meets_goal(self) -> bool | None:
        """Whether the median ratio reaches the goal (None without a goal)."""
        return None if self.goal is None else self.ratio.median >= self.goal


def compare(
    case: str,
    unit: str,
    baseline_name: str,
    baseline: Sequence[float],
    lethe: Sequence[float],
    goal: float | None = None,
) -> Comparison:
    """Build a :class:`Comparison` from paired measurements (repetition i of each side ran back to back)."""
    if len(baseline) != len(lethe):
        raise ValueError(f"paired measurements differ in length: {len(baseline)} and {len(lethe)}")
    ratios = [b and x / b for b, x in zip(baseline, lethe, strict=True)]
    return Comparison(case, unit, baseline_name, Summary.of(baseline), Summary.of(lethe), Summary.of(ratios), goal)


@dataclass
class BenchmarkResult:
    """What one benchmark reports: comparison rows, optional extra tables, settings and notes.

    Attributes:
        name: the name used by ``--only``.
        title: a heading for the results document.
        comparisons: the rows of the main table.
        tables: extra tables as (heading, column names, rows of cells), e.g. a time breakdown.
        settings: the workload parameters, shown under the table.
        notes: sentences shown under the table (computed observations, not interpretation).
        seconds: wall time of the whole benchmark.
    """

    name: str
    title: str
    comparisons: list[Comparison] = field(default_factory=list)
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class RunOptions:
    """How a benchmark should run.

    Attributes:
        quick: a tiny configuration (smoke test): seconds instead of minutes, numbers not comparable.
        data_dir: a scratch directory for server data (spool files, databases).
        log: where progress lines go.
    """

    quick: bool
    data_dir: Path
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)


def bench_config(data_dir: Path, **overrides: Any) -> Config:
    """A server configuration for a benchmark: :data:`BASE_SETTINGS` plus dotted-key ``overrides``."""
    settings: dict[str, Any] = {**BASE_SETTINGS, "storage.data_dir": str(data_dir)}
    settings.update(overrides)
    return load_config(env={}, overrides=settings)


@contextlib.contextmanager
def lethe_server(config: Config) -> Iterator[LetheClient]:
    """Run a real Lethe :class:`App` for ``config`` in a child process; yield a client connected to it.

    The server runs in its own process, as it is deployed, so it does not share the benchmark
    client's interpreter lock. Port 0 is replaced by the port the child reports.
    """
    with _child(_serve_lethe, config) as port:
        client = LetheClient(
            f"127.0.0.1:{port}", retries=1, timeout=120, max_message_bytes=config.server.max_message_bytes
        )
        try:
            yield client
        finally:
            client.close()


#: ``lethe.v1.Lethe``: bare servers register their handlers under the real service name, so
#: :class:`LetheClient` talks to them unchanged.
SERVICE = pb.DESCRIPTOR.services_by_name["Lethe"].full_name


@contextlib.contextmanager
def bare_server(
    handlers: Callable[..., Mapping[str, grpc.RpcMethodHandler]],
    *args: Any,
    threads: int,
    max_message_bytes: int,
) -> Iterator[LetheClient]:
    """A minimal grpcio server, in a child process, with only the handlers of ``lethe.v1.Lethe`` that
    ``handlers(*args)`` returns (method name -> handler; a module-level function, built in the child).

    Same thread pool, message-size options and concurrency limit as :func:`server.rpc.create_server`,
    but no interceptor, health, reflection or servicer. Yields a :class:`LetheClient` connected to it.
    """
    with _child(_serve_bare, handlers, args, threads, max_message_bytes) as port:
        client = LetheClient(f"127.0.0.1:{port}", retries=1, timeout=120, max_message_bytes=max_message_bytes)
        try:
            yield client
        finally:
            client.close()


@contextlib.contextmanager
def _child(target: Callable[..., None], *args: Any) -> Iterator[int]:
    """Start ``target(*args, connection, stop)`` in a spawned process; yield the port it sends back."""
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    stop = context.Event()
    process = context.Process(target=target, args=(*args, child, stop), daemon=True)
    process.start()
    try:
        if not parent.poll(180):
            raise RuntimeError("the benchmark server did not start within 180 s")
        reply = parent.recv()
        if isinstance(reply, str):
            raise RuntimeError(f"the benchmark server failed to start: {reply}")
        yield int(reply)
    finally:
        stop.set()
        process.join(60)
        if process.is_alive():
            process.kill()
            process.join()


def _serve_lethe(config: Config, connection: Connection, stop: EventType) -> None:
    app = App(config)
    try:
        connection.send(app.start().grpc)
    except Exception as error:  # reported to the parent, which raises it
        connection.send(f"{type(error).__name__}: {error}")
        return
    stop.wait()
    app.stop(grace=5)


def _serve_bare(
    handlers: Callable[..., Mapping[str, grpc.RpcMethodHandler]],
    args: tuple[Any, ...],
    threads: int,
    max_message_bytes: int,
    connection: Connection,
    stop: EventType,
) -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bare-rpc"),
        handlers=[grpc.method_handlers_generic_handler(SERVICE, dict(handlers(*args)))],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=threads * 16,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    if port == 0:
        connection.send("cannot listen on 127.0.0.1")
        return
    server.start()
    connection.send(port)
    stop.wait()
    server.stop(grace=1).wait()


def fmt_ratio(comparison: Comparison) -> str:
    """The ratio cell: median percent and range."""
    r = comparison.ratio
    if r.count == 1:
        return f"{100 * r.median:.0f}%"
    return f"{100 * r.median:.0f}% ({100 * r.low:.0f}–{100 * r.high:.0f}%)"


def fmt_goal(comparison: Comparison) -> str:
    """The goal cell: ``≥ 50% ✅`` / ``≥ 50% ❌`` or a dash."""
    if comparison.goal is None:
        return "—"
    return f"≥ {100 * comparison.goal:.0f}% {'met' if comparison.meets_goal else '**not met**'}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def result_markdown(result: BenchmarkResult, machine: str, when: str, quick: bool) -> str:
    """Render one benchmark's results (table, extra tables, settings, notes) as markdown."""
    parts = [f"### {result.title}", ""]
    stamp = f"Measured {when} on {machine}, {result.seconds:.0f} s."
    if quick:
        stamp += " **`--quick` smoke configuration: these numbers are not comparable.**"
    parts += [stamp, ""]
    if result.comparisons:
        rows = []
        for c in result.comparisons:
            digits = 0 if c.lethe.median >= 100 else 1
            rows.append(
                [
                    c.case,
                    f"{c.baseline_name}: {c.baseline.format(digits)} {c.unit}",
                    f"{c.lethe.format(digits)} {c.unit}",
                    fmt_ratio(c),
                    fmt_goal(c),
                ]
            )
        parts += [markdown_table(["case", "baseline", "measured", "measured / baseline", "goal"], rows), ""]
    for heading, header, rows in result.tables:
        parts += [f"**{heading}**", "", markdown_table(header, rows), ""]
    if result.settings:
        parts += ["Settings: " + "; ".join(f"{k} = {v}" for k, v in result.settings.items()) + ".", ""]
    parts += [f"- {note}" for note in result.notes]
    return "\n".join(parts).rstrip() + "\n"


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or :func:`platform.processor` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, str]:
    """Facts about this machine and the software versions, collected at run time."""
    import torch

    load = "n/a"
    with contextlib.suppress(OSError, AttributeError):
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return {
        "CPU": cpu_model(),
        "cores (os.cpu_count)": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "load average at start (1, 5, 15 min)": load,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": _version("grpcio"),
        "protobuf": _version("protobuf"),
        "numpy": _version("numpy"),
        "CUDA device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)",
    }


def machine_summary(info: dict[str, str]) -> str:
    """A one-line description: CPU and core count."""
    return f"{info['CPU']}, {info['cores (os.cpu_count)']} cores"


def now_utc() -> str:
    """The current UTC time, to the minute."""
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


class Stopwatch:
    """``with Stopwatch() as t: ...`` then ``t.seconds``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __enter__(self) -> Stopwatch:
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._started
