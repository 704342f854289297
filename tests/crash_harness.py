"""Shared helpers of the robustness suites: module-scoped databases, raw requests, state snapshots,
and the kill -9 / restart harness used by ``tests/integration/test_crash.py``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.pool import NullPool

from client import LetheClient, LetheError, pb
from client.audit import head_from_message, verify_audit, verify_chain, warnings_in
from protos import lethe_pb2_grpc as pb_grpc
from protos.audit_signing import AuditPublicKey
from protos.tensors import to_tensor
from tests.databases import fresh_postgres_database, postgres_admin_url
from tests.support import ServerProcess, digits

TERMINAL = (pb.SUCCEEDED, pb.FAILED, pb.CANCELLED)
#: The action of the audit event that records each way a job can end.
TERMINAL_ACTIONS = (
    "learn.succeeded",
    "learn.failed",
    "unlearn.succeeded",
    "unlearn.failed",
    "commit.succeeded",
    "commit.failed",
    "job.cancelled",
)


# --------------------------------------------------------------------------- databases
def module_database_url(backend: str, tmp: Path) -> Iterator[str]:
    """Like the ``database_url`` fixture, for module-scoped servers: SQLite under ``tmp`` or a fresh PostgreSQL."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp / 'lethe.db'}"
        return
    yield from fresh_postgres_database(postgres_admin_url())


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


# --------------------------------------------------------------------------- raw messages
def tensor(dtype: int, shape: Iterable[int], data: bytes) -> pb.Tensor:
    """A Tensor exactly as given, however wrong."""
    return pb.Tensor(dtype=dtype, shape=list(shape), data=data)


def learn_header(task: str = "fresh", **fields: Any) -> pb.LearnRequest:
    """A Learn stream's first message."""
    return pb.LearnRequest(header=pb.LearnHeader(task=task, **fields))


def learn_chunk(
    inputs: np.ndarray | pb.Tensor, labels: np.ndarray | pb.Tensor, sample_ids: Iterable[str] = ()
) -> pb.LearnRequest:
    """A chunk message; numpy arrays are encoded with ``to_tensor``, Tensors are sent as they are."""
    x = inputs if isinstance(inputs, pb.Tensor) else to_tensor(inputs)
    y = labels if isinstance(labels, pb.Tensor) else to_tensor(labels)
    return pb.LearnRequest(chunk=pb.SampleChunk(inputs=x, labels=y, sample_ids=list(sample_ids)))


def data_dir_leftovers(data_dir: Path) -> list[str]:
    """Temporary files anywhere under the data directory (``.partial``, ``.tmp``)."""
    return sorted(
        str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file() and p.suffix in (".partial", ".tmp")
    )


def data_files_rows(engine: Engine) -> list[tuple[Any, ...]]:
    """Every ``data_files`` row (id, kind, task, path, bytes, purged or not)."""
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT id, kind, task, path, bytes, purged_at IS NOT NULL FROM data_files ORDER BY id")
        )
        return [tuple(row) for row in rows]


def unaccounted_files(data_dir: Path, database_url: str, settle_seconds: float = 5.0) -> dict[str, list[str]]:
    """How the data directory differs from "live ``data_files`` rows, one of them a checkpoint"; {} when equal.

    Checkpoints are rows like every other file: each checkpoint file on disk must be a live row, and
    after a job has ended only one checkpoint row is live (the model's). The database, the audit key
    and the published audit head are not data files. Files of a job that just ended are deleted right
    after its commit, so a difference is re-read for up to ``settle_seconds`` before it is reported.
    """
    deadline = time.monotonic() + settle_seconds
    while True:
        engine = create_engine(database_url, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                rows = connection.execute(text("SELECT path, kind FROM data_files WHERE purged_at IS NULL")).all()
        finally:
            engine.dispose()
        live = {str(r[0]) for r in rows}
        model_checkpoints = (str(r[0]) for r in rows if r[1] == "checkpoint" and str(r[0]).startswith("checkpoints/"))
        live_checkpoints = sorted(model_checkpoints, key=_checkpoint_order)
        on_disk = {str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file()}
        # The database, the published audit head, the server's keys and its lock file are not task data.
        on_disk -= {p for p in on_disk if p.startswith(("lethe.db", "keys/")) or p in ("audit-head.json", "lethe.lock")}
        diff = {
            "on disk, not a live row": sorted(on_disk - live),
            "live row, not on disk": sorted(live - on_disk),
            "older checkpoints": live_checkpoints[:-1],
        }
        diff = {k: v for k, v in diff.items() if v}
        if not diff or time.monotonic() > deadline:
            return diff
        time.sleep(0.1)


def unaccounted_blobs(database_url: str, settle_seconds: float = 5.0) -> dict[str, list[str]]:
    """:func:`unaccounted_files` for ``storage.blob_url = "postgresql"``: the ``blobs`` table against the live
    ``data_files`` rows; {} when every published blob is a live row, every live row a blob, nothing is pending
    and one checkpoint is live."""
    deadline = time.monotonic() + settle_seconds
    while True:
        engine = create_engine(database_url, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                rows = connection.execute(text("SELECT path, kind FROM data_files WHERE purged_at IS NULL")).all()
                blobs = connection.execute(text("SELECT path, pending_path FROM blobs")).all()
        finally:
            engine.dispose()
        live = {str(r[0]) for r in rows}
        stored = {str(b[0]) for b in blobs if b[0] is not None}
        checkpoints = sorted((p for p in live if p.startswith("checkpoints/")), key=_checkpoint_order)
        diff = {
            "a blob, not a live row": sorted(stored - live),
            "live row, not a blob": sorted(live - stored),
            "pending blobs": sorted(str(b[1]) for b in blobs if b[0] is None),
            "older checkpoints": checkpoints[:-1],
        }
        diff = {k: v for k, v in diff.items() if v}
        if not diff or time.monotonic() > deadline:
            return diff
        time.sleep(0.1)


def _checkpoint_order(path: str) -> tuple[int, str]:
    return checkpoint_version(path), path


def checkpoint_version(name: str) -> int:
    """The model version in a checkpoint's file name (``ckpt-<version>-<job>-<attempt>.pt``)."""
    return int(name.rsplit("/", 1)[-1].split("-")[1].split(".")[0])


@dataclass(frozen=True)
class Snapshot:
    """Everything a rejected request must leave unchanged."""

    tasks: list[tuple[str, int, int]]
    jobs: list[tuple[str, int, int, str]]
    audit_events: int
    model_version: int
    spool: list[str]
    leftovers: list[str]
    data_files: list[tuple[Any, ...]]


def snapshot(client: LetheClient, data_dir: Path, engine: Engine) -> Snapshot:
    """The observable state of a server: via its API, its data directory and its database."""
    spool = data_dir / "spool"
    return Snapshot(
        tasks=sorted((t.name, t.state, t.samples) for t in client.tasks()),
        jobs=[(j.id, j.kind, j.state, j.task) for j in client.jobs(limit=1000)],
        audit_events=len(client.audit_events()),
        model_version=client.model().version,
        spool=sorted(p.name for p in spool.iterdir()) if spool.is_dir() else [],
        leftovers=data_dir_leftovers(data_dir),
        data_files=data_files_rows(engine),
    )


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def health_status(target: str, service: str = "lethe.v1.Lethe") -> int:
    """The server's health status for ``service`` (readiness by default)."""
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return int(reply.status)


# --------------------------------------------------------------------------- crash harness
@dataclass
class Accepted:
    """A job the server acknowledged to the client (the RPC returned it)."""

    id: str
    kind: int
    task: str


@dataclass
class CrashHarness:
    """Drives ``python -m server`` subprocesses on one data directory and database through kills and restarts.

    Records every job the server acknowledged, every task asked to be unlearned and every kill, and
    checks the durability invariants against them after a restart.
    """

    data_dir: Path
    database_url: str
    epochs: int = 6
    #: More ``lethe serve`` arguments of every start (``--set key=value`` pairs, say).
    server_args: tuple[str, ...] = ()
    #: The model is class-incremental (lure): Predict is asked without a task name.
    class_incremental: bool = False
    process: ServerProcess | None = None
    client: LetheClient | None = None
    accepted: dict[str, Accepted] = field(default_factory=dict)
    unlearned: set[str] = field(default_factory=set)
    #: Jobs seen RUNNING when the server was killed: each must be SUCCEEDED after the restart.
    running_at_kill: set[str] = field(default_factory=set)
    kills: int = 0
    starts: int = 0
    #: Seconds each start took until readiness (reported on failure, useful when tuning the suite).
    start_seconds: list[float] = field(default_factory=list)
    #: Every job's state as SQL had it at each kill (printed by the tests, for diagnosis).
    kill_log: list[str] = field(default_factory=list)
    _forgotten_answers: list[str] = field(default_factory=list)
    _watching: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> LetheClient:
        """Start the server (again) on the same data directory and database; wait for readiness."""
        assert self.process is None, "the server is already running"
        began = time.monotonic()
        self.process = ServerProcess(
            self.data_dir, self.database_url, "--set", "model.torch_threads=1", *self.server_args
        )
        self.process.wait_ready(timeout=120)
        self.start_seconds.append(time.monotonic() - began)
        self.starts += 1
        self.client = LetheClient(self.process.target, retries=3, timeout=30)
        return self.client

    def kill(self) -> None:
        """SIGKILL the server; remember which jobs were running at that instant (per SQL)."""
        assert self.process is not None and self.client is not None
        running = self._running_jobs()
        self.process.kill()
        self.running_at_kill |= running
        self.kills += 1
        self.client.close()
        self.process, self.client = None, None

    def stop(self) -> None:
        """Stop everything this harness started (test teardown)."""
        self._watching.set()
        if self._watcher is not None:
            self._watcher.join(30)
        if self.process is not None:
            if self.process.process.poll() is None:
                self.process.kill()
            self.process = None
        if self.client is not None:
            self.client.close()
            self.client = None

    def _running_jobs(self) -> set[str]:
        """The jobs SQL records as RUNNING; also logs every job's state at this kill."""
        engine = create_engine(self.database_url, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                rows = list(connection.execute(text("SELECT id, kind, task, state, progress FROM jobs ORDER BY seq")))
        finally:
            engine.dispose()
        self.kill_log.append(", ".join(f"{r[1]} {r[2]}: {r[3]} {r[4]:.2f}" for r in rows))
        return {str(r[0]) for r in rows if r[3] == "running"}

    # ------------------------------------------------------------------ work
    @property
    def api(self) -> LetheClient:
        assert self.client is not None, "the server is not running"
        return self.client

    def learn(self, task: str, classes: list[int], *, epochs: int | None = None, key: str | None = None) -> pb.Job:
        """Submit a Learn of the digits ``classes``; record the acknowledged job."""
        x, y = digits(classes)
        job = self.api.learn(task, x, y, epochs=epochs or self.epochs, idempotency_key=key)
        self.accepted[job.id] = Accepted(job.id, job.kind, job.task)
        return job

    def unlearn(self, task: str, *, key: str | None = None) -> pb.Job:
        """Submit an Unlearn; record the job and that ``task`` must never be predictable again."""
        job = self.api.unlearn(task, reason="crash test", idempotency_key=key)
        self.accepted[job.id] = Accepted(job.id, job.kind, job.task)
        self.unlearned.add(task)
        self._watch_forgotten()
        return job

    def wait_state(
        self,
        job_id: str,
        states: tuple[int, ...],
        min_progress: float = 0.0,
        timeout: float = 120,
        interval: float = 0.02,
    ) -> pb.Job:
        """Poll every ``interval`` seconds until the job is in one of ``states`` with at least ``min_progress``."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.api.job(job_id)
            if job.state in states and (job.state != pb.RUNNING or job.progress >= min_progress):
                return job
            if job.state in TERMINAL and job.state not in states:
                pytest.fail(f"job {job_id} ended {pb.JobState.Name(job.state)} while waiting: {job.message}")
            if time.monotonic() > deadline:
                pytest.fail(f"job {job_id} still {pb.JobState.Name(job.state)} ({job.progress:.2f}) after {timeout} s")
            time.sleep(interval)

    def settle(self, timeout: float = 240) -> list[pb.Job]:
        """Wait until every job is terminal; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.api.jobs(limit=1000)
            if all(j.state in TERMINAL for j in jobs):
                return jobs
            if time.monotonic() > deadline:
                pending = [(j.id, pb.JobState.Name(j.state), j.task) for j in jobs if j.state not in TERMINAL]
                pytest.fail(f"jobs not terminal after {timeout} s: {pending}")
            time.sleep(0.2)

    # ------------------------------------------------------------------ forgotten tasks are never served
    def _watch_forgotten(self) -> None:
        """From the first unlearn on, keep asking every server incarnation to predict the forgotten tasks."""
        if self._watcher is not None:
            return
        x, _ = digits([0])
        sample = x[:2]

        def watch() -> None:
            while not self._watching.is_set():
                process = self.process
                if process is None:
                    time.sleep(0.02)
                    continue
                with grpc.insecure_channel(process.target) as channel:
                    stub = pb_grpc.LetheStub(channel)
                    for task in sorted(self.unlearned):
                        request = pb.PredictRequest(task=task, inputs=to_tensor(sample))
                        try:
                            answer = stub.Predict(request, timeout=5)
                        except grpc.RpcError as exc:
                            if exc.code() not in (
                                grpc.StatusCode.FAILED_PRECONDITION,
                                grpc.StatusCode.UNAVAILABLE,  # killed, or still loading its model
                                grpc.StatusCode.DEADLINE_EXCEEDED,
                            ):
                                self._forgotten_answers.append(
                                    f"{task}: {exc.code().name} {exc.details()} from {process.target}"
                                )
                        else:
                            self._forgotten_answers.append(
                                f"{task}: answered by {process.target} (start {self.starts}, kill {self.kills}, "
                                f"model v{answer.model_version}) at {time.strftime('%H:%M:%S')}"
                            )
                time.sleep(0.05)

        self._watcher = threading.Thread(target=watch, name="forgotten-watcher", daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------------ invariants
    def check(self) -> list[pb.Job]:
        """Assert every durability invariant on the running server; return the jobs."""
        client = self.api
        jobs = self.settle()
        by_id = {j.id: j for j in jobs}

        # Every acknowledged job exists exactly once, nothing else was created, each ended once.
        assert len(by_id) == len(jobs), "duplicate job ids"
        assert set(by_id) == set(self.accepted), (
            f"jobs lost: {set(self.accepted) - set(by_id)}; unexpected: {set(by_id) - set(self.accepted)}"
        )
        head = client.audit_head()  # before the events: signed, published outside the database
        events = client.audit_events()
        assert verify_chain(events) is None, verify_chain(events)
        key = AuditPublicKey.from_pem(head.public_key)
        report = verify_audit(events, public_key=key, head=head_from_message(head))
        assert report.ok and report.unsigned == 0, report
        assert warnings_in(events) == [], "a restart found its published audit head disagreeing with the database"
        assert sum(e.action == "server.started" for e in events) == self.starts
        for job in jobs:
            endings = [e.action for e in events if e.job_id == job.id and e.action in TERMINAL_ACTIONS]
            # An unlearn whose task never reached the model is done within its request (no ending event).
            instant = job.kind == pb.UNLEARN and job.state == pb.SUCCEEDED and "never reached" in job.message
            assert len(endings) == (0 if instant else 1), f"job {job.id} ({job.task}) ended {endings}"
            requested = [e for e in events if e.job_id == job.id and e.action.endswith(".requested")]
            assert len(requested) == 1, f"job {job.id} was requested {len(requested)} times"
        for job_id in self.running_at_kill:
            job = by_id[job_id]
            assert job.state == pb.SUCCEEDED, f"job {job_id} running at the kill ended {job.state}: {job.message}"

        # One evaluation row per successful job, and the model version of the newest one is served.
        succeeded = [j for j in jobs if j.state == pb.SUCCEEDED]
        rows = client.evaluations()
        assert sorted(r.job_id for r in rows) == sorted(j.id for j in succeeded)
        versions = [j.model_version for j in succeeded if j.kind == pb.LEARN]
        assert len(versions) == len(set(versions)), f"two learn jobs produced one model version: {versions}"
        expected_version = max((j.model_version for j in succeeded), default=0)
        assert client.model().version == expected_version

        # Tasks: learned ones serve predictions, unlearned ones never do and their data is gone.
        tasks = {t.name: t for t in client.tasks()}
        learned_classes = sorted({c for t in tasks.values() if t.state == pb.LEARNED for c in t.classes})
        for job in succeeded:
            if job.kind == pb.LEARN and job.task not in self.unlearned:
                assert tasks[job.task].state == pb.LEARNED, f"{job.task} is {tasks[job.task].state}"
                x, _ = digits(list(tasks[job.task].classes))
                # A class-incremental model answers without a task name, in the classes of every task.
                name, allowed = (
                    (None, learned_classes) if self.class_incremental else (job.task, tasks[job.task].classes)
                )
                prediction = client.predict(name, x[:64])
                assert prediction.model_version == expected_version
                assert np.isin(prediction.classes, list(allowed)).all()
        x, _ = digits([0])
        for name in self.unlearned:
            assert tasks[name].state == pb.UNLEARNED, f"{name} is {pb.TaskState.Name(tasks[name].state)}"
            with pytest.raises(LetheError) as refused:
                client.predict(name, x[:2])
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        purged = [
            f["path"]
            for e in events
            if e.action in ("data.purged", "checkpoint.pruned")
            for f in json.loads(e.details_json)["files"]
        ]
        for name in self.unlearned:
            assert any(e.action == "data.purged" and e.task == name for e in events), f"no purge of {name}"
        assert not [p for p in purged if (self.data_dir / p).exists()], "purged files still on disk"
        assert not self._forgotten_answers, f"a forgotten task was served: {self._forgotten_answers[:5]}"

        # The data directory: no spool of a finished job, no temporary leftovers.
        spool = self.data_dir / "spool"
        assert not (list(spool.iterdir()) if spool.is_dir() else []), "spool files of finished jobs remain"
        assert data_dir_leftovers(self.data_dir) == []
        assert unaccounted_files(self.data_dir, self.database_url) == {}
        newest = self.checkpoints()[0] if self.checkpoints() else None
        if expected_version:
            assert newest is not None and checkpoint_version(newest) == expected_version, (
                f"newest checkpoint {newest}, model {expected_version}"
            )
        return jobs

    def checkpoints(self) -> list[str]:
        """Checkpoint file names, newest first."""
        directory = self.data_dir / "checkpoints"
        names = [p.name for p in directory.iterdir()] if directory.is_dir() else []
        return sorted(names, key=lambda n: (checkpoint_version(n), n), reverse=True)

    def assert_idle_restart_changes_nothing(self) -> None:
        """Kill the idle server and start it again: same state, one checkpoint left by recovery."""
        before = (
            sorted((t.name, t.state, t.learned_version, t.unlearned_version) for t in self.api.tasks()),
            [(j.id, j.state, j.model_version) for j in self.api.jobs(limit=1000)],
            self.api.model().version,
        )
        self.kill()
        self.start()
        after = (
            sorted((t.name, t.state, t.learned_version, t.unlearned_version) for t in self.api.tasks()),
            [(j.id, j.state, j.model_version) for j in self.api.jobs(limit=1000)],
            self.api.model().version,
        )
        assert after == before
        self.check()
        assert len(self.checkpoints()) == 1, f"recovery left {self.checkpoints()}"
