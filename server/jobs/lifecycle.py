"""Every job and task state transition, in one place, checked against one table.

Nothing else in the server assigns a job's or a task's ``state`` (a test greps for it). Each
method works inside the caller's transaction and appends the audit events that go with the
transition, so a state change and its record commit together or not at all. Paths of files to
delete are returned; the caller deletes them after the commit.

Terminal outcomes are counted in ``lethe_jobs_total`` only once their transaction commits
(:func:`on_outcome_commit`), so the metric and the audit trail agree for every outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from server.data import BlobStore, FileRecord
from server.data.layout import parse_checkpoint_name
from server.storage import (
    AuditLog,
    DataFile,
    DataFileKind,
    DataFileRepository,
    Job,
    JobKind,
    JobRepository,
    JobState,
    SampleRepository,
    Task,
    TaskRepository,
    TaskState,
    utc_now,
)

J, T = JobState, TaskState
#: Allowed job transitions; ``None`` is "no row yet".
JOB_TRANSITIONS: frozenset[tuple[JobState | None, JobState]] = frozenset(
    {
        (None, J.QUEUED),
        (None, J.SUCCEEDED),  # an unlearn whose task's data never reached the model
        (J.QUEUED, J.RUNNING),
        (J.QUEUED, J.CANCELLED),
        (J.RUNNING, J.SUCCEEDED),
        (J.RUNNING, J.FAILED),
        (J.RUNNING, J.CANCELLED),
        (J.RUNNING, J.QUEUED),  # interrupted by shutdown or a crash: runs again
    }
)
#: Allowed task transitions; ``None`` is "no row" (created, or deleted because it never reached the model).
TASK_TRANSITIONS: frozenset[tuple[TaskState | None, TaskState | None]] = frozenset(
    {
        (None, T.LEARNING),
        (T.LEARNING, T.LEARNED),
        (T.LEARNING, None),
        (T.LEARNING, T.UNLEARNING),
        (T.LEARNING, T.UNLEARNED),
        (T.LEARNED, T.UNLEARNING),
        (T.UNLEARNING, T.UNLEARNED),
        (T.UNLEARNING, T.LEARNED),  # its queued unlearn was cancelled
        (T.UNLEARNING, T.LEARNING),  # idem, before its learn ran
        (T.LEARNING, T.TEMPORARY),  # a TEMPORARY learn reached its side network
        (T.TEMPORARY, T.LEARNED),  # committed
        (T.TEMPORARY, T.UNLEARNING),
        (T.UNLEARNING, T.TEMPORARY),  # its queued unlearn was cancelled
    }
)
#: ``session.info`` key of the outcomes waiting for their transaction to commit.
_PENDING_OUTCOMES = "lethe_job_outcomes"


class IllegalTransitionError(RuntimeError):
    """A state change the lifecycle table does not allow (a bug, never a user error)."""


def on_outcome_commit(sessions: sessionmaker[Session], callback: Callable[[str, str], None]) -> None:
    """Call ``callback(kind, outcome)`` for every job that reached a terminal state, once committed."""

    def committed(session: Session) -> None:
        for kind, outcome in session.info.pop(_PENDING_OUTCOMES, []):
            callback(kind, outcome)

    def rolled_back(session: Session) -> None:
        session.info.pop(_PENDING_OUTCOMES, None)

    event.listen(sessions, "after_commit", committed)
    event.listen(sessions, "after_rollback", rolled_back)


def file_entry(f: DataFile) -> dict[str, object]:
    """How a file appears in an audit event: as recorded when it was written."""
    return {"path": f.path, "kind": f.kind.value, "bytes": f.bytes, "sha256": f.sha256}


#: Why a purge proof may lack the deletion-time digest: no data directory was given (unit tests only).
UNCHECKED = "unchecked"


def deletion_entry(f: DataFile | None, path: str, found: FileRecord | str | None) -> dict[str, object]:
    """How a deleted file appears in a purge proof: as recorded, and as it was on disk when deleted.

    ``bytes``/``sha256`` are the ``data_files`` record (written when the file was; empty for a file
    whose writer never completed it). ``at_deletion`` is ``present`` with ``bytes_at_deletion`` and
    ``sha256_at_deletion`` read from disk when it was purged, or ``missing`` (no such file: nothing
    left to delete). ``mismatch`` flags a present file whose bytes differ from the record.

    Args:
        f: The file's row, or None for a file on disk that had none (a checkpoint from before
            checkpoints were rows): then ``recorded`` is false.
        path: The file's path relative to the data directory.
        found: What is on disk now (None: missing), or :data:`UNCHECKED`.
    """
    entry: dict[str, object] = file_entry(f) if f is not None else {"path": path, "recorded": False}
    if isinstance(found, str):
        entry["at_deletion"] = found
        return entry
    if found is None:
        entry.update(at_deletion="missing", bytes_at_deletion=None, sha256_at_deletion=None, mismatch=False)
        return entry
    recorded = f is not None and bool(f.sha256)
    differs = recorded and f is not None and (found.sha256 != f.sha256 or found.bytes != f.bytes)
    entry.update(
        at_deletion="present", bytes_at_deletion=found.bytes, sha256_at_deletion=found.sha256, mismatch=differs
    )
    return entry


class Lifecycle:
    """Job and task transitions with their audit events, inside the caller's transaction.

    Args:
        audit_log: Where the events go (the server's is signed); a plain one by default.
        blobs: The blob store, read at deletion time for the purge proofs' digests. Without it
            (unit tests of transitions) proofs say ``at_deletion: unchecked``.
    """

    def __init__(self, audit_log: AuditLog | None = None, blobs: BlobStore | None = None) -> None:
        self.audit_log = audit_log or AuditLog()
        self.blobs = blobs

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _job(session: Session, job: Job, new: JobState, now: datetime | None = None) -> None:
        old = job.state  # None on a row not yet added
        if (old, new) not in JOB_TRANSITIONS:
            raise IllegalTransitionError(f"job {job.id}: {old} -> {new} is not allowed")
        job.state = new
        if new.terminal:
            job.finished_at = now or utc_now()
            outcome = "succeeded" if new == J.SUCCEEDED else new.value
            session.info.setdefault(_PENDING_OUTCOMES, []).append((job.kind.value, outcome))

    @staticmethod
    def _task(session: Session, task: Task, new: TaskState | None, now: datetime | None = None) -> None:
        old = task.state  # None on a row not yet added
        if (old, new) not in TASK_TRANSITIONS:
            raise IllegalTransitionError(f"task {task.name}: {old} -> {new} is not allowed")
        if new is None:
            session.delete(task)
            return
        task.state, task.updated_at = new, now or utc_now()

    # ----------------------------------------------------------------- creation
    def new_task(
        self, session: Session, name: str, samples: int, classes: Sequence[int], *, temporary: bool = False
    ) -> Task:
        """A task row in LEARNING (``temporary``: its learn is a TEMPORARY one)."""
        task = Task(name=name, samples=samples, created_at=utc_now(), temporary=temporary)
        task.classes = list(classes)
        self._task(session, task, T.LEARNING)
        TaskRepository(session).add(task)
        return task

    def new_job(self, session: Session, job: Job, state: JobState = J.QUEUED) -> Job:
        """Add ``job`` (built without a state) as QUEUED, or SUCCEEDED for an unlearn done at once."""
        self._job(session, job, state, job.created_at)
        if state == J.SUCCEEDED:
            job.started_at, job.progress = job.created_at, 1.0
        JobRepository(session).add(job)
        return job

    # ------------------------------------------------------------------ running
    def claim(self, session: Session, job: Job) -> None:
        """QUEUED → RUNNING (one more attempt)."""
        self._job(session, job, J.RUNNING)
        job.started_at, job.attempts, job.progress, job.message = utc_now(), job.attempts + 1, 0.0, "running"

    def requeue(self, session: Session, job: Job, why: str) -> list[str]:
        """RUNNING → QUEUED; the files its attempt recorded (not its spool) are purged."""
        self._job(session, job, J.QUEUED)
        job.started_at, job.progress, job.message = None, 0.0, why
        return self.purge(session, self.attempt_files(session, job), job, f"attempt ended: {why}")

    def succeed(self, session: Session, job: Job, version: int, metrics: dict[str, float], message: str) -> None:
        """RUNNING → SUCCEEDED."""
        self._job(session, job, J.SUCCEEDED)
        job.progress, job.model_version, job.metrics, job.message = 1.0, version, metrics, message

    def fail(self, session: Session, job: Job, message: str) -> list[str]:
        """RUNNING → FAILED, audited; a learn that never reached the model frees its task name."""
        self._job(session, job, J.FAILED)
        job.message = message[:2000]
        self._audit(session, job, f"{job.kind.value}.failed", job.principal, {"error": job.message})
        return self._drop_job_data(session, job, job.principal, "learn failed")

    def cancel(self, session: Session, job: Job, principal: str, why: str) -> list[str]:
        """QUEUED or RUNNING → CANCELLED, audited; the job's data is purged and its task restored."""
        self._job(session, job, J.CANCELLED)
        job.message = why
        self._audit(session, job, "job.cancelled", principal, {"why": why, "kind": job.kind.value})
        task = TaskRepository(session).get_for_update(job.task)
        if job.kind == JobKind.UNLEARN and task is not None and task.state == T.UNLEARNING:
            reached = T.TEMPORARY if task.temporary else T.LEARNED
            self._task(session, task, reached if task.learned_version is not None else T.LEARNING)
            return []
        return self._drop_job_data(session, job, principal, why)

    def _drop_job_data(self, session: Session, job: Job, principal: str, why: str) -> list[str]:
        """Purge what an unsuccessful job leaves: its task if the task never reached the model, else its files.

        The samples a records unlearn had claimed are free again; a Learn's samples leave the index.
        """
        if job.kind != JobKind.LEARN:
            SampleRepository(session).release(job.id)
            return self.purge(session, self.attempt_files(session, job), job, why, principal=principal)
        SampleRepository(session).drop_job(job.id)
        task = TaskRepository(session).get_for_update(job.task)
        if task is not None and task.state == T.LEARNING:
            doomed = DataFileRepository(session).live(task=task.name)
            self._task(session, task, None)  # it never reached the model; the name is free again
        else:
            doomed = [f for f in DataFileRepository(session).live(task=job.task) if f.job_id == job.id]
        return self.purge(session, doomed, job, why, principal=principal)

    @staticmethod
    def attempt_files(session: Session, job: Job) -> list[DataFile]:
        """Live task-data files recorded by the running attempt of ``job`` (not a Learn's spool).

        Its checkpoint is not one of them: :mod:`server.jobs.checkpoint_rows` discards it with the model.
        """
        files = DataFileRepository(session).live(job_id=job.id)
        return [
            f
            for f in files
            if f.kind != DataFileKind.CHECKPOINT and (f.kind != DataFileKind.SPOOL or job.kind != JobKind.LEARN)
        ]

    # ----------------------------------------------------------------- tasks
    def task_learned(
        self, session: Session, task: Task, version: int, *, temporary: bool = False, ttl_seconds: int = 0
    ) -> None:
        """A learn reached the model: LEARNING → LEARNED, or TEMPORARY for a temporary learn.

        An UNLEARNING task stays UNLEARNING. A temporary task expires ``ttl_seconds`` from now (0: never).
        """
        now = utc_now()
        if task.state == T.LEARNING:
            self._task(session, task, T.TEMPORARY if temporary else T.LEARNED, now)
        task.learned_version, task.learned_at = version, now
        if temporary and ttl_seconds > 0:
            task.expires_at = now + timedelta(seconds=ttl_seconds)

    def task_committed(self, session: Session, task: Task, version: int) -> None:
        """A temporary task was merged into the main model: TEMPORARY → LEARNED (an UNLEARNING one stays)."""
        now = utc_now()
        if task.state == T.TEMPORARY:
            self._task(session, task, T.LEARNED, now)
        task.temporary, task.expires_at = False, None
        task.learned_version, task.learned_at = version, now

    def task_unlearning(self, session: Session, task: Task) -> None:
        """An unlearn was accepted."""
        if task.state != T.UNLEARNING:  # a retry after a failed unlearn
            self._task(session, task, T.UNLEARNING)

    def task_unlearned(self, session: Session, task: Task) -> None:
        """The task is forgotten (or its data never reached the model)."""
        now = utc_now()
        self._task(session, task, T.UNLEARNED, now)
        task.unlearned_at, task.ops_since_unlearn = now, 0
        task.temporary, task.expires_at = False, None
        SampleRepository(session).drop_task(task.name)

    # ----------------------------------------------------------------- purge
    def on_disk(self, path: str) -> FileRecord | str | None:
        """Size and SHA-256 of a data file as it is now (None: missing; :data:`UNCHECKED` without a blob store)."""
        return self.blobs.digest(path) if self.blobs is not None else UNCHECKED

    def purge(
        self,
        session: Session,
        doomed: Sequence[DataFile],
        job: Job,
        why: str,
        *,
        principal: str | None = None,
        found: Mapping[str, FileRecord | None] | None = None,
    ) -> list[str]:
        """Mark files purged (with one ``data.purged`` event); return their paths to delete after commit.

        The event is the purge proof: every file as recorded and as it is on disk now, at deletion
        time (read here, unless the caller read it before its transaction and passes ``found``),
        with a flag where the two differ and ``missing`` where there was nothing left to delete.

        Args:
            session: The caller's transaction.
            doomed: The files' rows.
            job: The job the purge belongs to.
            why: The reason, in words.
            principal: Who caused it (the job's principal by default).
            found: Deletion-time digests by path, read by the caller (None for a missing file).
        """
        if not doomed:
            return []
        files = DataFileRepository(session)
        on_disk = {f.path: found[f.path] if found and f.path in found else self.on_disk(f.path) for f in doomed}
        entries = [deletion_entry(f, f.path, on_disk[f.path]) for f in doomed]
        for f in doomed:
            files.mark_purged(f.path)
        details = {
            "why": why,
            "files": entries,
            "bytes": sum(f.bytes for f in doomed),
            "bytes_at_deletion": sum(r.bytes for r in on_disk.values() if isinstance(r, FileRecord)),
            "mismatches": sum(1 for e in entries if e.get("mismatch")),
        }
        self._audit(session, job, "data.purged", principal or job.principal, details, task=doomed[0].task)
        return [f.path for f in doomed]

    def prune_checkpoints(
        self,
        session: Session,
        doomed: Sequence[DataFile],
        found: Mapping[str, FileRecord | None],
        *,
        unrecorded: Sequence[str] = (),
        job_id: str = "",
        why: str,
    ) -> list[str]:
        """Mark checkpoint rows purged with one ``checkpoint.pruned`` event; return the paths to delete.

        A checkpoint holds the influence of every job up to its model version, forgotten data
        included: its deletion is proven like a data file's, with its model version.

        Args:
            session: The caller's transaction.
            doomed: Live checkpoint rows to purge.
            found: Deletion-time digests by path, read before the transaction (None: missing).
            unrecorded: Checkpoint files that have no row (written before checkpoints were rows).
            job_id: The job whose commit (or failure) made them obsolete; "" at start-up.
            why: The reason, in words.
        """
        if not doomed and not unrecorded:
            return []
        files = DataFileRepository(session)
        entries = []
        for f in doomed:
            entries.append(deletion_entry(f, f.path, found[f.path] if f.path in found else self.on_disk(f.path)))
            files.mark_purged(f.path)
        entries += [deletion_entry(None, p, found[p] if p in found else self.on_disk(p)) for p in unrecorded]
        for entry in entries:
            parsed = parse_checkpoint_name(str(entry["path"]))
            entry["model_version"] = parsed.version if parsed is not None else None
        details = {"why": why, "files": entries, "bytes": sum(f.bytes for f in doomed)}
        self.audit_log.append(session, principal="system", action="checkpoint.pruned", job_id=job_id, details=details)
        return [f.path for f in doomed] + list(unrecorded)

    def _audit(
        self, session: Session, job: Job, action: str, principal: str, details: dict[str, object], task: str = ""
    ) -> None:
        self.audit_log.append(
            session, principal=principal, action=action, task=task or job.task, job_id=job.id, details=details
        )
