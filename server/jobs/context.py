"""What every job handler works with: the model, storage, data layout and the running job's state."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from sqlalchemy.orm import Session, sessionmaker

from server.checkpoints import CheckpointMeta, CheckpointStore
from server.data import BlobStore, FileBlobStore, FileRecord
from server.data.layout import DataLayout
from server.data.sample_ids import SampleIdKey
from server.engine.protocol import Predictor, Progress, Strategy, TaskData
from server.jobs import checkpoint_rows
from server.jobs.evaluation import ProbeCache
from server.jobs.events import JobEvents
from server.jobs.lifecycle import Lifecycle
from server.jobs.retry import retry_database
from server.jobs.serving import ServingState
from server.storage import AuditLog, DataFile, DataFileKind, DataFileRepository, Job, TaskRepository, TaskState
from server.telemetry import Telemetry

log = logging.getLogger(__name__)
R = TypeVar("R")


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker needs from the configuration."""

    data_dir: Path
    seed: int
    max_probe_samples: int
    forget_probe_ops: int
    #: Points the reference may lie outside the forgotten task's 95% interval (training.forget_tolerance).
    forget_tolerance: float = 5.0
    #: Forgetting operations per unlearn, the first included (training.forget_max_attempts).
    forget_max_attempts: int = 3


@dataclass
class JobRun:
    """One attempt of one job, as the handlers see it.

    Attributes:
        job: the job row as claimed (detached; re-read it inside a transaction to change it).
        progress: report progress; raises when the job must stop (cancel, shutdown).
        started: ``time.monotonic()`` when the attempt started.
        changed_model: whether the computation changed the model (an unlearn of a task whose data
            never reached it does not).
        metrics: the job's metrics, filled by the computation, the measurements and the commit.
        files: files the attempt wrote, with digests, for the commit to record.
    """

    job: Job
    progress: Progress
    started: float = field(default_factory=time.monotonic)
    changed_model: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    files: list[FileRecord] = field(default_factory=list)


class JobContext:
    """The strategy the worker owns and everything a handler needs around it."""

    def __init__(
        self,
        strategy_factory: Callable[[], Strategy],
        sessions: sessionmaker[Session],
        events: JobEvents,
        serving: ServingState,
        telemetry: Telemetry,
        settings: WorkerSettings,
        audit_log: AuditLog | None = None,
        *,
        sample_key: SampleIdKey | None = None,
        blobs: BlobStore | None = None,
    ) -> None:
        self.factory = strategy_factory
        self.strategy = strategy_factory()
        self.sessions = sessions
        self.events = events
        self.serving = serving
        self.telemetry = telemetry
        self.settings = settings
        self.layout = DataLayout(settings.data_dir)
        #: Where spools, task data and checkpoints are (``storage.blob_url``; the data directory by default).
        self.blobs = blobs if blobs is not None else FileBlobStore(settings.data_dir)
        self.checkpoints = CheckpointStore(self.blobs)
        self.probes = ProbeCache(self.blobs)
        self.sample_key = sample_key or SampleIdKey(settings.data_dir / "keys" / "sample-ids.key")
        if not self.strategy.task_incremental:  # one output space: serve the rollback point while forgetting
            serving.set_rollback(self.rollback_predictor)
        self.lifecycle = Lifecycle(audit_log, blobs=self.blobs)
        self.stopping = threading.Event()
        self.deadline = math.inf

    def rollback_predictor(self, tasks: Collection[str]) -> Predictor | None:
        """A snapshot of the model before any of ``tasks`` was learned, if the strategy keeps one.

        Called from RPC threads; the strategy's ``rollback_predictor`` reads only immutable state.
        """
        learned = {t for t in tasks if self.serving.task_state(t) not in (TaskState.LEARNING, None)}
        if not learned:  # only data of queued learns: the published model never saw it
            return self.serving.predictor
        build = getattr(self.strategy, "rollback_predictor", None)
        return build(learned) if build is not None else None

    # -------------------------------------------------------------- database
    def must_stop(self) -> bool:
        """The server is stopping and the grace period is over."""
        return self.stopping.is_set() and time.monotonic() > self.deadline

    def retry(self, work: Callable[[], R], what: str) -> R:
        """Run one transaction, retrying while the database is away (see :func:`retry_database`)."""
        return retry_database(work, stopping=self.must_stop, wake=self.stopping, what=what)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any exception."""
        with self.sessions() as session, session.begin():
            yield session

    def read(self, query: Callable[[Session], R], what: str) -> R:
        """Run a read-only query, retrying while the database is away."""

        def work() -> R:
            with self.sessions() as session:
                return query(session)

        return self.retry(work, what)

    # ----------------------------------------------------------------- model
    def replay(self, exclude: str | None = None) -> dict[str, TaskData]:
        """Retained data of every live task but ``exclude``, for strategies that replay."""
        if not self.strategy.needs_replay:
            return {}
        return self.retained(exclude={exclude} if exclude is not None else set())

    def retained(self, exclude: Collection[str] = (), *, temporary: bool = False) -> dict[str, TaskData]:
        """Retained training data of every live task but ``exclude``, whatever the strategy replays.

        Tasks held by side networks (temporary ones) are left out unless ``temporary``: their data
        must never reach the main model before a commit.
        """

        def query(session: Session) -> tuple[list[DataFile], set[str]]:
            files = DataFileRepository(session).live(kind=DataFileKind.RETAINED)
            held = {t.name for t in TaskRepository(session).list() if t.temporary}
            return files, held

        files, held = self.read(query, "reading retained data")
        replay: dict[str, TaskData] = {}
        for f in files:
            if f.task not in exclude and f.bytes > 0 and (temporary or f.task not in held):
                arrays = self.blobs.load_arrays(f.path)
                replay[f.task] = TaskData(torch.from_numpy(arrays["inputs"]), torch.from_numpy(arrays["labels"]))
        return replay

    def checkpoint(self, job: Job, metrics: dict[str, float]) -> None:
        """Write the model after ``job`` (it becomes the model's only once the job commits).

        Its ``data_files`` row is committed first (see :mod:`server.jobs.checkpoint_rows`).
        """
        checkpoint_rows.record_intent(self, job)
        meta = CheckpointMeta(self.strategy.version, job.id, metrics)
        state = self.strategy.state_dict()
        # Retried like a transaction: with blobs in the database (storage.blob_url) the write is one.
        self.retry(lambda: self.checkpoints.save(meta, state, attempt=job.attempts), "writing the checkpoint")

    def restore(self, discard_job: str | None = None) -> None:
        """Rebuild the model from the newest checkpoint, first deleting one written by ``discard_job``.

        A job that failed after its checkpoint was written never committed: its checkpoint must not
        become the model (it would hold a job SQL says failed). Its row is purged, audited.
        """
        if discard_job is not None:
            checkpoint_rows.discard(self, discard_job)
        newest = self.checkpoints.load_latest()
        if newest is not None and discard_job is not None and newest.meta.last_job_id == discard_job:
            log.warning("discarding checkpoint %s of job %s, which did not commit", newest.path, discard_job)
            self.blobs.delete(newest.path)
            newest = self.checkpoints.load_latest()
        self.strategy = self.factory()
        if newest is not None:
            self.strategy.load_state_dict(newest.strategy_state)
        self.serving.publish(self.strategy.predictor())
