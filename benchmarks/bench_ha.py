"""High availability on PostgreSQL: failover time, replica lag, and Predict across a primary and a replica.

``make bench ARGS="--only ha"`` (opt-in: it needs PostgreSQL, ``LETHE_BENCH_DATABASE_URL`` or the
local ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``; each run creates a database of its
own and drops it).

- **Failover**: a primary (``lethe serve``, server defaults, digits MLP learned) and a hot standby on
  one database and data directory; ``kill -9`` of the primary; the seconds until the standby reports
  ``lethe.v1.Lethe`` SERVING. The killed one comes back as the next trial's standby, so each trial
  fails over the other way.
- **Replica lag**: a replica (``--role replica``) on the same database and data directory. After a
  Learn's job reads SUCCEEDED on the primary, the seconds until the replica answers the new task
  with the primary's model version; after an Unlearn is accepted, the seconds until the replica
  refuses the task.
- **Predict throughput**: rows per second against the primary alone, then against the primary and
  the replica, with the clients in processes of their own; interleaved repetitions, the baseline in
  the same run. Two clients:

  - h2load (:mod:`benchmarks.h2load`, a native load generator that costs the machine a few
    microseconds a call): the same calls in flight, all on the primary or split evenly across the
    two. This measures the servers; it is the issue's goal. The primary alone is measured twice: at
    its defaults, and with all its threads on one core (a second baseline that no hand-off between
    threads on different cores can slow; see :mod:`server.rpc.affinity`).
  - the Python client (its threads share one :class:`~client.LetheClient`, round-robin over the
    addresses it is given): what a Python application gets. It costs about as much CPU per call as
    the server, so on a machine whose cores it shares with the servers it takes what a replica would use.

  The CPU time of the servers, of the client and of the whole machine (``/proc``) is read around
  each timed window: the per-replica efficiency (rows per server CPU second with the replica ÷
  without) and the most the idle CPU lets a replica add on this machine come from the same run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import h2load
from benchmarks.bench_peer import Target, digits, measure_usage
from benchmarks.report import BenchmarkResult, RunOptions
from benchmarks.servers import ServerProcess, free_port, health_probe, lethe_argv
from benchmarks.timing import Stopwatch, Summary, compare, cpu_usage, interleaved
from client import LetheClient, LetheError
from protos import lethe_pb2 as pb
from protos.tensors import to_tensor

NAME = "ha"
#: Where the benchmark creates its database.
DATABASE_ENV = "LETHE_BENCH_DATABASE_URL"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
#: The issue's goals: failover p50 within 10 s; primary + 1 replica at least 1.5x the primary alone.
GOAL_FAILOVER_P50 = 10.0
GOAL_SCALE = 1.5
PREDICT_METHOD = "lethe.v1.Lethe/Predict"


@dataclass(frozen=True)
class HaSettings:
    """The workload: failover trials, lag trials, throughput repetitions, seconds, rows, client threads."""

    failovers: int = 5
    lags: int = 5
    repeats: int = 5
    seconds: float = 3.0
    rows: int = 64
    threads: int = 8
    #: The native load generator's HTTP/2 connections and calls in flight on each (alone; halved per server for two).
    connections: int = 2
    streams: int = 4


FULL = HaSettings()
QUICK = HaSettings(failovers=1, lags=1, repeats=1, seconds=0.5)


@contextlib.contextmanager
def _database() -> Iterator[str]:
    from sqlalchemy import create_engine, make_url, text
    from sqlalchemy.pool import NullPool

    admin = make_url(os.environ.get(DATABASE_ENV, DEFAULT_ADMIN_URL))
    name = f"lethe_bench_{uuid.uuid4().hex[:12]}"
    engine = create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield admin.set(database=name).render_as_string(hide_password=False)
        finally:
            with engine.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


class Cluster:
    """``lethe serve`` processes on one database and data directory."""

    def __init__(self, root: Path, database_url: str) -> None:
        self.root = root
        self.url = database_url
        self.servers: list[tuple[ServerProcess, str]] = []
        #: Each server's Prometheus port, by its address.
        self.metrics: dict[str, int] = {}

    def start(self, role: str = "primary", *, wait_for: str = "lethe.v1.Lethe") -> tuple[ServerProcess, str]:
        """A server of ``role``, once ``wait_for`` reports SERVING ("" = the process is up: a standby)."""
        port, metrics = free_port(), free_port()
        target = f"127.0.0.1:{port}"
        self.metrics[target] = metrics
        argv = lethe_argv(
            self.root / "data", port, {"server.role": role, "server.metrics_port": metrics}, database_url=self.url
        )
        server = ServerProcess(argv, health_probe(target, wait_for), self.root / f"server-{port}.log")
        self.servers.append((server, target))
        return server, target

    def stop(self) -> None:
        """Stop every server."""
        for server, _ in self.servers:
            server.stop()


def _serving(target: str) -> bool:
    return health_probe(target)()


def failover_seconds(cluster: Cluster, settings: HaSettings, options: RunOptions) -> list[float]:
    """Kill -9 the primary ``settings.failovers`` times; seconds until the standby serves, each time."""
    primary, _ = cluster.start()
    times = []
    for trial in range(settings.failovers):
        standby, standby_target = cluster.start(wait_for="")
        deadline = time.monotonic() + 60
        while "STANDBY" not in standby.tail() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(primary.pid, signal.SIGKILL)
        primary.process.wait(10)
        killed = time.monotonic()
        while not _serving(standby_target):
            if time.monotonic() - killed > 120:
                raise RuntimeError(f"the standby did not take over:\n{standby.tail()}")
            time.sleep(0.02)
        times.append(time.monotonic() - killed)
        options.log(f"  failover {trial + 1}/{settings.failovers}: {times[-1]:.2f} s")
        primary = standby
    return times


def _answers(replica: LetheClient, task: str, x: np.ndarray, version: int) -> bool:
    try:
        return replica.predict(task, x).model_version >= version
    except LetheError:
        return False


def _refuses(replica: LetheClient, task: str, x: np.ndarray) -> bool:
    try:
        replica.predict(task, x)
    except LetheError:
        return True
    return False


def _until(condition: object, limit: float = 60.0) -> float:
    started = time.monotonic()
    while not condition():  # type: ignore[operator]
        if time.monotonic() - started > limit:
            raise RuntimeError("the replica did not follow within a minute")
        time.sleep(0.01)
    return time.monotonic() - started


def replica_lags(
    primary: LetheClient, replica: LetheClient, settings: HaSettings, options: RunOptions
) -> tuple[list[float], list[float]]:
    """(seconds from a learn's SUCCEEDED to the replica answering, from an unlearn's acceptance to it refusing)."""
    inputs, labels = digits()
    x = inputs[:8]
    learns, unlearns = [], []
    for trial in range(settings.lags):
        task = f"lag-{trial}"
        job = primary.wait(primary.learn(task, inputs, labels, epochs=1).id, timeout=600)
        learns.append(_until(partial(_answers, replica, task, x, job.model_version)))
        primary.unlearn(task)
        unlearns.append(_until(partial(_refuses, replica, task, x)))
        options.log(f"  lag {trial + 1}/{settings.lags}: learn {learns[-1]:.2f} s, unlearn {unlearns[-1]:.2f} s")
    return learns, unlearns


ALONE = "primary alone"
BOTH = "primary + 1 replica"
#: The primary alone with all its threads on one core: no cross-core hand-off (see docs/benchmarks.md).
ONE_CORE = "primary alone, on one core"


def throughput(
    inputs: Path, primary: str, replica: str, pids: dict[str, int], settings: HaSettings, options: RunOptions
) -> dict[str, list[dict[str, float]]]:
    """Interleaved Predict throughput against the primary alone and against both; each with its CPU use."""
    usage: dict[str, list[dict[str, float]]] = {ALONE: [], BOTH: []}

    def variant(label: str, targets: list[str]) -> float:
        measured = measure_usage(
            Target(label, ",".join(targets), "predict"),
            inputs,
            settings.rows,
            settings.threads,
            settings.seconds,
            [pids[t] for t in targets],
        )
        usage[label].append(measured)
        return measured["rows_per_second"]

    interleaved(
        {ALONE: partial(variant, ALONE, [primary]), BOTH: partial(variant, BOTH, [primary, replica])},
        settings.repeats,
        log=lambda r, x: options.log(f"  throughput {r}: " + ", ".join(f"{k} {v:,.0f}" for k, v in x.items())),
    )
    return {label: measured[-settings.repeats :] for label, measured in usage.items()}  # the warm-up round dropped


def predict_codes(metrics_port: int) -> Counter[str]:
    """Predict calls a server has answered so far, by gRPC status code (its ``lethe_grpc_requests_total``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    codes: Counter[str] = Counter()
    for family in text_string_to_metric_families(text):
        if family.name == "lethe_grpc_requests":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["method"].rsplit("/", 1)[-1] == "Predict":
                    codes[sample.labels["code"]] += int(sample.value)
    return codes


def check_answered(loads: h2load.Loads, answered: Counter[str], in_flight: int) -> None:
    """Raise RuntimeError unless the servers answered OK every call h2load counted done.

    ``answered``: the servers' Predict calls by gRPC status code during the run (warm-up included);
    ``in_flight``: the calls h2load had in flight, which it abandons when it stops (the servers count
    those CANCELLED).
    """
    done = sum(load.done for load in loads.loads)
    failed = sum(load.failed for load in loads.loads)
    failed += sum(n for code, n in answered.items() if code not in ("OK", "CANCELLED"))
    if failed or answered["OK"] < done or answered["CANCELLED"] > in_flight:
        raise RuntimeError(f"h2load: {done} calls done, the servers answered {dict(answered)}")


def native_load(cluster: Cluster, targets: list[str], body: Path, rows: int, settings: HaSettings) -> dict[str, float]:
    """Rows per second of h2load against ``targets`` (one process each), with the CPU of the run.

    The calls in flight are split evenly across ``targets``: the total stays the same however many share
    it. Raises RuntimeError unless the servers answered every call h2load counted with OK (h2load sees
    only HTTP status, not gRPC's): :func:`check_answered`.
    """
    per_target = max(1, settings.connections // len(targets))
    before = {target: predict_codes(cluster.metrics[target]) for target in targets}
    pids = [server.pid for server, target in cluster.servers if target in targets]
    usage = cpu_usage(pids)
    loads = h2load.run_together(
        targets,
        PREDICT_METHOD,
        body,
        connections=per_target,
        streams=settings.streams,
        seconds=settings.seconds,
        warmup=min(1.0, settings.seconds),
    )
    after = cpu_usage(pids)
    answered: Counter[str] = Counter()
    for target in targets:
        answered += predict_codes(cluster.metrics[target]) - before[target]
    check_answered(loads, answered, per_target * settings.streams * len(targets))
    return {
        "rows_per_second": loads.requests_per_second * rows,
        "server_cpu": after["server_cpu"] - usage["server_cpu"],
        "client_cpu": loads.cpu_seconds,
        "busy_cpu": after["busy_cpu"] - usage["busy_cpu"],
        "wall": after["wall"] - usage["wall"],
    }


@contextlib.contextmanager
def one_core(pid: int) -> Iterator[None]:
    """Every thread of process ``pid`` on the first CPU it may use, then back on all of them (Linux)."""

    def pin(cpus: set[int]) -> None:
        for thread in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(thread), cpus)

    allowed = os.sched_getaffinity(pid)
    pin({min(allowed)})
    try:
        yield
    finally:
        pin(allowed)


def native_throughput(
    cluster: Cluster, body: Path, primary: str, replica: str, settings: HaSettings, options: RunOptions
) -> dict[str, list[dict[str, float]]]:
    """:func:`throughput` with h2load as the client, and the primary alone once more with its threads on one core."""
    usage: dict[str, list[dict[str, float]]] = {ALONE: [], ONE_CORE: [], BOTH: []}
    pid = next(server.pid for server, target in cluster.servers if target == primary)

    def variant(label: str, targets: list[str]) -> float:
        with one_core(pid) if label == ONE_CORE else contextlib.nullcontext():
            usage[label].append(native_load(cluster, targets, body, settings.rows, settings))
        return usage[label][-1]["rows_per_second"]

    interleaved(
        {label: partial(variant, label, [primary]) for label in (ALONE, ONE_CORE)}
        | {BOTH: partial(variant, BOTH, [primary, replica])},
        settings.repeats,
        log=lambda r, x: options.log(f"  h2load {r}: " + ", ".join(f"{k} {v:,.0f}" for k, v in x.items())),
    )
    return {label: measured[-settings.repeats :] for label, measured in usage.items()}


def _cores(measured: dict[str, float], key: str) -> float:
    return measured[key] / measured["wall"]


def _per_server_cpu(measured: dict[str, float]) -> float:
    """Rows per CPU second of the serving processes."""
    return measured["rows_per_second"] * measured["wall"] / measured["server_cpu"]


def cpu_table(usage: dict[str, list[dict[str, float]]], client: str) -> tuple[str, list[str], list[list[str]]]:
    """Where the machine's CPU went during the throughput measurements with ``client`` (medians over repetitions)."""
    rows = []
    for label, measured in usage.items():
        rows.append(
            [
                label,
                f"{Summary.of([m['rows_per_second'] for m in measured]).median:,.0f}",
                f"{Summary.of([_cores(m, 'server_cpu') for m in measured]).median:.2f}",
                f"{Summary.of([_cores(m, 'client_cpu') for m in measured]).median:.2f}",
                f"{Summary.of([_cores(m, 'busy_cpu') for m in measured]).median:.2f} of {os.cpu_count()}",
                f"{Summary.of([_per_server_cpu(m) for m in measured]).median:,.0f}",
            ]
        )
    return (
        f"Where the CPU goes during Predict with {client} (cores busy, medians)",
        ["servers", "rows/s", "server processes", "client", "machine", "rows per server CPU second"],
        rows,
    )


def scaling_notes(usage: dict[str, list[dict[str, float]]], client: str) -> list[str]:
    """Per baseline: the per-replica efficiency, and what the idle CPU lets a replica add here (this run)."""
    cores = os.cpu_count() or 1
    notes = []
    for baseline in (label for label in usage if label != BOTH):
        pairs = list(zip(usage[baseline], usage[BOTH], strict=True))
        efficiency = Summary.of([_per_server_cpu(b) / _per_server_cpu(a) for a, b in pairs])
        busy = Summary.of([_cores(a, "busy_cpu") for a, _ in pairs]).median
        notes.append(
            f"{client}, against the {baseline}: per-replica efficiency (rows per server CPU second with the replica "
            f"÷ without) {efficiency.format(2)}. Without the replica the machine was {busy:.2f} of {cores} cores "
            f"busy: at that cost per row, the idle rest lets a replica on the same cores reach at most "
            f"{cores / busy:.2f}× (more only where each server does more per CPU second, efficiency above 1). "
            f"With a core of its own for each server and the clients elsewhere (separate hosts or pods), the same "
            f"efficiency means about {2 * efficiency.median:.2f}×."
        )
    return notes


def _report_throughput(
    result: BenchmarkResult, usage: dict[str, list[dict[str, float]]], case: str, client: str, goal: float | None
) -> None:
    rates = {label: [u["rows_per_second"] for u in measured] for label, measured in usage.items()}
    for baseline in (label for label in usage if label != BOTH):
        result.comparisons.append(
            compare(f"{case}: primary + 1 replica", "rows/s", baseline, rates[baseline], rates[BOTH], goal)
        )
    result.tables.append(cpu_table(usage, client))
    result.notes.extend(scaling_notes(usage, client))


def run(options: RunOptions, settings: HaSettings | None = None) -> BenchmarkResult:
    """The HA benchmark (see the module doc)."""
    settings = settings or (QUICK if options.quick else FULL)
    result = BenchmarkResult(NAME, "High availability: failover, replica lag, Predict on a primary and a replica")
    with Stopwatch() as total, tempfile.TemporaryDirectory(prefix="ha-", dir=options.data_dir) as tmp:
        root = Path(tmp)
        with _database() as url:
            cluster = Cluster(root / "failover", url)
            try:
                failovers = failover_seconds(cluster, settings, options)
            finally:
                cluster.stop()
        with _database() as url:
            cluster = Cluster(root / "scale", url)
            try:
                _, primary_target = cluster.start()
                inputs, labels = digits()
                with LetheClient(primary_target, retries=3, timeout=60) as primary:
                    primary.wait(primary.learn("digits", inputs, labels, epochs=5).id, timeout=600)
                    _, replica_target = cluster.start("replica")
                    with LetheClient(replica_target, retries=0, timeout=60) as replica:
                        learns, unlearns = replica_lags(primary, replica, settings, options)
                batch = inputs[: settings.rows]
                native = None
                if h2load.H2LOAD:
                    (root / "predict.grpc").write_bytes(
                        h2load.grpc_frame(pb.PredictRequest(task="digits", inputs=to_tensor(batch)))
                    )
                    native = native_throughput(
                        cluster, root / "predict.grpc", primary_target, replica_target, settings, options
                    )
                np.save(root / "inputs.npy", batch)
                pids = {target: server.pid for server, target in cluster.servers}
                usage = throughput(root / "inputs.npy", primary_target, replica_target, pids, settings, options)
            finally:
                cluster.stop()
    in_flight = settings.connections * settings.streams
    if native is None:
        result.notes.append("h2load is not installed (apt-get install nghttp2-client): the native client was skipped.")
    else:
        case = f"Predict, {settings.rows} rows, h2load ({in_flight} calls in flight)"
        _report_throughput(result, native, case, "h2load", GOAL_SCALE)
    case = f"Predict, {settings.rows} rows, Python client ({settings.threads} threads)"
    _report_throughput(result, usage, case, "the Python client", None)
    failover = Summary.of(failovers)
    verdict = "met" if failover.median <= GOAL_FAILOVER_P50 else "NOT met"
    rows = [
        [
            "kill -9 of the primary → the standby serves",
            failover.format(2),
            str(len(failovers)),
            f"p50 ≤ {GOAL_FAILOVER_P50:g} s: {verdict} (max {max(failovers):.2f} s)",
        ],
        [
            "a learn SUCCEEDED on the primary → the replica answers it",
            Summary.of(learns).format(2),
            str(len(learns)),
            "≤ 5 s",
        ],
        [
            "an unlearn accepted → the replica refuses the task",
            Summary.of(unlearns).format(2),
            str(len(unlearns)),
            "≤ 2 s",
        ],
    ]
    result.tables.append(
        ("Failover and replica lag (seconds): median (range)", ["what", "seconds", "trials", "goal"], rows)
    )
    result.settings = {
        "servers": "lethe serve at its defaults (uncle, mlp) on one PostgreSQL database and one data directory",
        "clients": f"h2load, {settings.connections} connections × {settings.streams} calls in flight, split evenly "
        f"over the servers; the Python client, {settings.threads} threads of one process sharing one LetheClient "
        "(round-robin over the addresses it is given)",
        "repetitions": str(settings.repeats),
    }
    result.seconds = total.seconds
    return result
