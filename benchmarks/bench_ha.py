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
- **Predict throughput**: rows per second of a client process (its threads share one client)
  against the primary alone, then against the primary and the replica (the client given both
  addresses sends reads round-robin). Interleaved repetitions; the baseline is the primary alone in
  the same run. The client process reads the CPU time of the servers, its own and the machine's
  (``/proc``) right around its timed window: the per-replica efficiency (rows per server CPU second
  with the replica ÷ alone) and the most a replica can add on this machine (its cores ÷ the cores
  the primary alone keeps busy) come from the same run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks.bench_peer import Target, digits, measure_usage
from benchmarks.report import BenchmarkResult, RunOptions
from benchmarks.servers import ServerProcess, free_port, health_probe, lethe_argv
from benchmarks.timing import Stopwatch, Summary, compare, interleaved
from client import LetheClient, LetheError

NAME = "ha"
#: Where the benchmark creates its database.
DATABASE_ENV = "LETHE_BENCH_DATABASE_URL"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
#: The issue's goals: failover p50 within 10 s; primary + 1 replica at least 1.5x the primary alone.
GOAL_FAILOVER_P50 = 10.0
GOAL_SCALE = 1.5


@dataclass(frozen=True)
class HaSettings:
    """The workload: failover trials, lag trials, throughput repetitions, seconds, rows, client threads."""

    failovers: int = 5
    lags: int = 5
    repeats: int = 5
    seconds: float = 3.0
    rows: int = 64
    threads: int = 8


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

    def start(self, role: str = "primary", *, wait_for: str = "lethe.v1.Lethe") -> tuple[ServerProcess, str]:
        """A server of ``role``, once ``wait_for`` reports SERVING ("" = the process is up: a standby)."""
        port = free_port()
        target = f"127.0.0.1:{port}"
        argv = lethe_argv(
            self.root / "data", port, {"server.role": role, "server.metrics_port": -1}, database_url=self.url
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


def _cores(measured: dict[str, float], key: str) -> float:
    return measured[key] / measured["wall"]


def _per_server_cpu(measured: dict[str, float]) -> float:
    """Rows per CPU second of the serving processes."""
    return measured["rows_per_second"] * measured["wall"] / measured["server_cpu"]


def cpu_table(usage: dict[str, list[dict[str, float]]]) -> tuple[str, list[str], list[list[str]]]:
    """Where the machine's CPU went during the throughput measurements (medians over repetitions)."""
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
        "Where the CPU goes during Predict (cores busy, medians)",
        ["servers", "rows/s", "server processes", "client process", "machine", "rows per server CPU second"],
        rows,
    )


def scaling_notes(usage: dict[str, list[dict[str, float]]]) -> list[str]:
    """The per-replica efficiency, and the most a replica can add on this machine (measured in this run)."""
    efficiency = Summary.of(
        [_per_server_cpu(b) / _per_server_cpu(a) for a, b in zip(usage[ALONE], usage[BOTH], strict=True)]
    )
    cores = os.cpu_count() or 1
    bound = Summary.of([cores / _cores(a, "busy_cpu") for a in usage[ALONE]])
    return [
        f"Per-replica efficiency (rows per server CPU second with the replica ÷ the primary alone): "
        f"{efficiency.format(2)}.",
        f"Bound on this machine: the primary alone kept {cores / bound.median:.2f} of its {cores} cores busy (its "
        f"event loop holds one core; the client process and the kernel the rest), so a replica on the same cores can "
        f"add at most the idle remainder: primary + 1 replica ≤ {bound.median:.2f}× the primary alone here, whatever "
        f"the servers do. With a core of its own for each server and the clients elsewhere (separate hosts or pods), "
        f"the same efficiency means about {2 * efficiency.median:.2f}×.",
    ]


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
                np.save(root / "inputs.npy", inputs[: settings.rows])
                pids = {target: server.pid for server, target in cluster.servers}
                usage = throughput(root / "inputs.npy", primary_target, replica_target, pids, settings, options)
            finally:
                cluster.stop()
    rates = {label: [u["rows_per_second"] for u in measured] for label, measured in usage.items()}
    result.comparisons.append(
        compare(
            f"Predict, {settings.rows} rows × {settings.threads} client threads: primary + 1 replica",
            "rows/s",
            ALONE,
            rates[ALONE],
            rates[BOTH],
            GOAL_SCALE,
        )
    )
    result.tables.append(cpu_table(usage))
    result.notes.extend(scaling_notes(usage))
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
        "client": "one process, its threads share one LetheClient (round-robin over the addresses it is given)",
        "repetitions": str(settings.repeats),
    }
    result.seconds = total.seconds
    return result
