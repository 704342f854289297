"""Every job and task state transition, in one place, checked against one table.

Nothing else in the server assigns a job's or a task's ``state`` (a test greps for it). Each
method works inside the caller's transaction and appends the audit events that go with the
transition, so a state change and its record commit together or not at all. Paths of files to
delete are returned; the caller deletes them after the commit.

Terminal outcomes are counted in ``lethe_jobs_total`` only once their transaction commits
(:func:`on_outcome_commit`), so the metric and the audit trail agree for every outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

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
    """How a file appears in an audit event."""
    return {"path": f.path, "kind": f.kind.value, "bytes": f.bytes, "sha256": f.sha256}


class Lifecycle:
    """Job and task transitions with their audit events, inside the caller's transaction."""

    def __init__(self, audit_log: AuditLog | None = None) -> None:
        self.audit_log = audit_log or AuditLog()

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
    def new_task(self, session: Session, name: str, samples: int, classes: Sequence[int]) -> Task:
        """A task row in LEARNING."""
        task = Task(name=name, samples=samples, created_at=utc_now())
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
            self._task(session, task, T.LEARNED if task.learned_version is not None else T.LEARNING)
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
        """Live files recorded by the running attempt of ``job`` (everything but a Learn's spool)."""
        files = DataFileRepository(session).live(job_id=job.id)
        return [f for f in files if f.kind != DataFileKind.SPOOL or job.kind != JobKind.LEARN]

    # ----------------------------------------------------------------- tasks
    def task_learned(self, session: Session, task: Task, version: int) -> None:
        """A learn reached the model: LEARNING → LEARNED (an UNLEARNING task stays UNLEARNING)."""
        if task.state == T.LEARNING:
            self._task(session, task, T.LEARNED)
        task.learned_version, task.learned_at = version, utc_now()

    def task_unlearning(self, session: Session, task: Task) -> None:
        """An unlearn was accepted."""
        if task.state != T.UNLEARNING:  # a retry after a failed unlearn
            self._task(session, task, T.UNLEARNING)

    def task_unlearned(self, session: Session, task: Task) -> None:
        """The task is forgotten (or its data never reached the model)."""
        now = utc_now()
        self._task(session, task, T.UNLEARNED, now)
        task.unlearned_at, task.ops_since_unlearn = now, 0
        SampleRepository(session).drop_task(task.name)

    # ----------------------------------------------------------------- purge
    def purge(
        self,
        session: Session,
        doomed: Sequence[DataFile],
        job: Job,
        why: str,
        *,
        principal: str | None = None,
    ) -> list[str]:
        """Mark files purged (with one ``data.purged`` event); return their paths to delete after commit."""
        if not doomed:
            return []
        files = DataFileRepository(session)
        for f in doomed:
            files.mark_purged(f.path)
        details = {"why": why, "files": [file_entry(f) for f in doomed], "bytes": sum(f.bytes for f in doomed)}
        self._audit(session, job, "data.purged", principal or job.principal, details, task=doomed[0].task)
        return [f.path for f in doomed]

    def _audit(
        self, session: Session, job: Job, action: str, principal: str, details: dict[str, object], task: str = ""
    ) -> None:
        self.audit_log.append(
            session, principal=principal, action=action, task=task or job.task, job_id=job.id, details=details
        )
