"""Read replicas (``server.role = replica``, DESIGN.md section 9): Predict from the primary's published models.

A replica shares the primary's database and blob store (``storage.blob_url``: the database itself
with ``postgresql``, else a shared volume) and writes nothing:
it has no worker and no lease, and the fence on its sessions refuses every commit. A follower
thread reads the database at every commit of the primary (PostgreSQL: it listens for the
notification each commit sends) and every :data:`POLL_SECONDS` in any case:

1. the unlearns accepted and not finished: each is *held* as on the primary (its tasks refused; a
   class-incremental model answers nothing) from the poll after its acceptance until the replica
   has published a model at least as new as the one the unlearn produced;
2. the newest committed checkpoint (a live ``data_files`` row with its digest): when it is newer
   than the one served, it is loaded and published;
3. every task's state, mirrored.

So a replica never answers from a model older than an unlearn that has SUCCEEDED, and stops
answering for an unlearned task within one read of its acceptance (milliseconds with the
notification, at most a poll interval without).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from server.data.blobs import BlobStore
from server.data.layout import parse_checkpoint_name
from server.engine.protocol import Strategy
from server.jobs.serving import ServingState
from server.lease import CHANGES_CHANNEL
from server.storage import DataFile, DataFileKind, Job, JobKind, JobState, TaskRepository

log = logging.getLogger(__name__)

#: Seconds between polls of the database.
POLL_SECONDS = 0.5
#: A replica whose last successful poll is older than this reports itself not ready.
STALE_SECONDS = 5.0


@dataclass(frozen=True)
class Published:
    """What the primary has committed, as a replica serving some version reads it."""

    version: int
    path: str
    #: Unlearns to hold: job id -> (its tasks, the model version it produced; 0 while unfinished).
    unlearns: dict[str, tuple[frozenset[str], int]]


class ReplicaFollower:
    """Keeps a replica's serving state in step with the primary's commits (see the module doc).

    Args:
        sessions: the shared database.
        blobs: the shared blob store, where the primary writes its checkpoints.
        strategy: a strategy of the configured model, loaded with each new checkpoint.
        serving: what Predict reads.
        on_ready: called with True once a model is served and polls succeed, False when they go stale.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        blobs: BlobStore,
        strategy: Strategy,
        serving: ServingState,
        on_ready: Callable[[bool], None],
    ) -> None:
        self.sessions = sessions
        self.blobs = blobs
        self.strategy = strategy
        self.serving = serving
        self.on_ready = on_ready
        self.version = 0
        self.last_sync = 0.0
        self._ready = False
        self._held: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lethe-replica", daemon=True)
        if not strategy.task_incremental:
            serving.set_rollback(lambda tasks: None)  # while data is being forgotten: answer nothing

    def start(self) -> None:
        """Sync once now (so a replica starts serving at once), then follow in a thread."""
        self._sync_logged()
        self._thread.start()

    def stop(self) -> None:
        """Stop following."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        listener = ChangeListener(self.sessions) if _is_postgres(self.sessions) else None
        try:
            while not self._stop.is_set():
                if listener is not None:
                    listener.wait(POLL_SECONDS)  # a commit's notification, or the poll interval
                else:
                    self._stop.wait(POLL_SECONDS)
                if not self._stop.is_set():
                    self._sync_logged()
        finally:
            if listener is not None:
                listener.close()

    def _sync_logged(self) -> None:
        try:
            self.sync()
        except Exception as exc:  # the database or a file is away: keep serving what is loaded
            log.warning("replica: could not follow the primary (%s)", exc)
        stale = time.monotonic() - self.last_sync > STALE_SECONDS
        ready = self.version > 0 and not stale
        if ready != self._ready:
            self._ready = ready
            self.on_ready(ready)

    def sync(self) -> None:
        """One poll: held unlearns, the newest committed model, task states."""
        with self.sessions() as session:
            states = {t.name: t.state for t in TaskRepository(session).list()}
            published = _published(session, self.version)
        for job_id, (tasks, _) in published.unlearns.items():
            if job_id not in self._held:
                self.serving.hold(job_id, tasks)
                self._held.add(job_id)
        if published.version > self.version:
            self._load(published.path, published.version)
        self.serving.load_tasks(states)  # after the model: a task it has is never refused as unknown
        for job_id in list(self._held):
            produced = published.unlearns.get(job_id, (frozenset(), -1))[1]
            if produced != 0 and produced <= self.version:  # ended, and its model (if any) is served
                self.serving.release(job_id)
                self._held.discard(job_id)
        self.last_sync = time.monotonic()

    def _load(self, path: str, version: int) -> None:
        with self.blobs.open(path) as f:  # streamed: a file, or the database's chunks as torch reads them
            payload = torch.load(f, map_location="cpu", weights_only=True)
        self.strategy.load_state_dict(payload["strategy"])
        self.serving.publish(self.strategy.predictor())
        self.version = version
        log.info("replica: serving model version %d", version)


def _published(session: Session, served: int) -> Published:
    """The newest committed checkpoint and the unlearns a replica serving version ``served`` must hold."""
    committed = session.scalars(
        select(DataFile).where(
            DataFile.kind == DataFileKind.CHECKPOINT, DataFile.purged_at.is_(None), DataFile.sha256 != ""
        )
    ).all()
    newest = max(
        ((parsed.version, row.path) for row in committed if (parsed := parse_checkpoint_name(Path(row.path).name))),
        default=(0, ""),
    )
    unfinished = Job.state.in_((JobState.QUEUED, JobState.RUNNING))
    not_yet_served = (Job.state == JobState.SUCCEEDED) & (Job.model_version > served)
    jobs = session.scalars(select(Job).where(Job.kind == JobKind.UNLEARN, unfinished | not_yet_served)).all()
    unlearns = {
        job.id: (_forgotten_tasks(job), int(job.model_version or 0) if job.state == JobState.SUCCEEDED else 0)
        for job in jobs
    }
    return Published(newest[0], newest[1], unlearns)


def _forgotten_tasks(job: Job) -> frozenset[str]:
    """The tasks whose data an unlearn job forgets: its task, or a records unlearn's tasks."""
    tasks = job.options.get("tasks") if isinstance(job.options, dict) else None
    return frozenset(tasks) if tasks else frozenset({job.task})


def _is_postgres(sessions: sessionmaker[Session]) -> bool:
    bind = sessions.kw.get("bind")
    return bind is not None and bind.dialect.name == "postgresql"


class ChangeListener:
    """PostgreSQL: ``LISTEN`` on :data:`CHANGES_CHANNEL`, which the primary notifies at every commit.

    A replica then syncs within milliseconds of a commit instead of at its next poll; polling stays
    the fallback (a missed notification; a broken connection, reopened at the next wait).
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._engine = sessions.kw["bind"]
        self._raw: Any = None

    def _connect(self) -> Any:
        if self._raw is None:
            raw = self._engine.raw_connection()
            connection = raw.driver_connection
            connection.autocommit = True
            connection.execute(f"LISTEN {CHANGES_CHANNEL}")
            self._raw = raw
        return self._raw.driver_connection

    def wait(self, timeout: float) -> bool:
        """Block until a notification or ``timeout``; True if one came."""
        try:
            return any(True for _ in self._connect().notifies(timeout=timeout, stop_after=1))
        except Exception as exc:
            log.warning("replica: listening for changes failed (%s); polling", exc)
            self.close()
            time.sleep(timeout)
            return False

    def close(self) -> None:
        """Stop listening."""
        raw, self._raw = self._raw, None
        if raw is not None:
            try:
                raw.close()
            except Exception:  # closing a broken connection
                log.debug("replica: closing the change listener failed", exc_info=True)
