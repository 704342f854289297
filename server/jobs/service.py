"""The job queue's front door: submissions, cancellation and queries, each in one SQL transaction.

Every method opens its own session and commits it, so the RPC layer never sees a half-written
state: a request either fully happens (job row, task row, data-file rows and audit events) or
raises a domain error and changes nothing.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from server.data import BlobStore, FileBlobStore, FileRecord
from server.data.sample_ids import SampleIdKey, server_made_id
from server.engine.protocol import LearnOptions
from server.engine.temporary import FORGET_METHOD
from server.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from server.jobs.events import JobEvents
from server.jobs.lifecycle import Lifecycle
from server.jobs.serving import ServingState
from server.storage import (
    AuditEvent,
    AuditLog,
    DataFile,
    DataFileKind,
    DataFileRepository,
    EvaluationRepository,
    EvaluationRow,
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

log = logging.getLogger(__name__)
#: How long a read of an ended job waits for the worker to finish deleting its superseded files.
_SETTLE_SECONDS = 10.0

#: Seconds a client is told to wait before resending a request refused because the queue is full.
QUEUE_FULL_RETRY_SECONDS = 10.0


@dataclass(frozen=True)
class LearnSubmission:
    """A validated Learn header with every option resolved (zeros replaced by defaults)."""

    task: str
    idempotency_key: str
    options: LearnOptions
    metadata: dict[str, str] = field(default_factory=dict)
    #: TEMPORARY learns: seconds from the learn's end until the task is unlearned unless committed (0: never).
    ttl_seconds: int = 0


@dataclass(frozen=True)
class CommitSubmission:
    """A validated Commit request."""

    task: str
    idempotency_key: str


@dataclass(frozen=True)
class UnlearnSubmission:
    """A validated Unlearn request."""

    task: str
    reason: str
    idempotency_key: str
    method: str


@dataclass(frozen=True)
class QueueLimits:
    """Limits enforced at submission."""

    max_queued_jobs: int
    max_tasks: int
    #: Seconds a write waits for start-up recovery before UNAVAILABLE.
    ready_wait_seconds: float = 30.0
    #: Seconds CancelJob waits for a running job to stop.
    cancel_wait_seconds: float = 30.0
    #: Tasks held (or to be held) by side networks at once (``limits.max_temporary_tasks``).
    max_temporary_tasks: int = 100


class JobService:
    """Submits, cancels and reads jobs, tasks, evaluations and audit events.

    Writes wait until :meth:`mark_ready` (start-up recovery done): before that, a new spool could
    be swept as an orphan, or a state accepted here undone by the state reload.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        data_dir: Path,
        events: JobEvents,
        serving: ServingState,
        limits: QueueLimits,
        audit_log: AuditLog | None = None,
        *,
        sample_key: SampleIdKey | None = None,
        blobs: BlobStore | None = None,
    ) -> None:
        self.sessions = sessions
        self.data_dir = data_dir
        #: Where spools are written (``storage.blob_url``; the data directory by default).
        self.blobs = blobs if blobs is not None else FileBlobStore(data_dir)
        self.events = events
        self.serving = serving
        self.limits = limits
        self.lifecycle = Lifecycle(audit_log, blobs=self.blobs)
        self.audit_log = self.lifecycle.audit_log
        self._ready = threading.Event()
        #: Set on a hot standby or a read replica: the error every write gets.
        self.refuse_writes: Callable[[], Exception] | None = None
        self.sample_key = sample_key or SampleIdKey(data_dir / "keys" / "sample-ids.key")

    def mark_ready(self) -> None:
        """Recovery is done: accept writes."""
        self._ready.set()

    def writable(self) -> None:
        """Raise unless this server accepts writes now (primary, recovered)."""
        refuse = self.refuse_writes
        if refuse is not None:
            raise refuse()
        if not self._ready.wait(self.limits.ready_wait_seconds):
            raise UnavailableError(
                "the server is still recovering its state after a start; retry shortly",
                reason="SERVER_STARTING",
                retry_after=1.0,
            )

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any exception."""
        with self.sessions() as session, session.begin():
            yield session

    # ----------------------------------------------------------------- learn
    def existing_job(self, idempotency_key: str, kind: JobKind, task: str) -> Job | None:
        """The job an earlier request with this idempotency key created, if any.

        Raises:
            FailedPreconditionError: the key was used for a different kind of request or task.
        """
        if not idempotency_key:
            return None
        with self.sessions() as session:
            return self._matching(session, idempotency_key, kind, task)

    @staticmethod
    def _matching(session: Session, idempotency_key: str, kind: JobKind, task: str) -> Job | None:
        if not idempotency_key:
            return None
        job = JobRepository(session).by_idempotency_key(idempotency_key)
        if job is not None and (job.kind != kind or job.task != task):
            raise FailedPreconditionError(
                f"idempotency_key {idempotency_key!r} was already used for a {job.kind.value} of task "
                f"{job.task!r} (job {job.id}); use a new key for a different request",
                reason="IDEMPOTENCY_KEY_REUSED",
                metadata={"job_id": job.id, "task": job.task},
            )
        return job

    def check_learn(self, submission: LearnSubmission) -> Job | None:
        """Fail fast, before the stream is read, when the Learn cannot be accepted.

        Returns:
            The job of an earlier request with the same idempotency key (answer with it, read
            nothing more), or None: go on.
        """
        self.writable()
        with self.sessions() as session:
            existing = self._matching(session, submission.idempotency_key, JobKind.LEARN, submission.task)
            return existing or self._check_learn(session, submission)

    def _check_learn(self, session: Session, submission: LearnSubmission) -> Job | None:
        """None when the Learn may go on; the first attempt's job when this is its retry."""
        tasks, jobs, task_name = TaskRepository(session), JobRepository(session), submission.task
        task = tasks.get(task_name)
        if task is not None:
            # The first attempt of a retry may have committed since the key was looked up.
            existing = self._matching(session, submission.idempotency_key, JobKind.LEARN, task_name)
            if existing is not None:
                return existing
            about = {"task": task_name, "state": task.state.value}
            if task.state in (TaskState.UNLEARNING, TaskState.UNLEARNED):
                raise AlreadyExistsError(
                    f"task {task_name!r} is {task.state.value}; task names are never reused, choose a new name",
                    reason="TASK_NAME_RETIRED",
                    metadata=about,
                )
            raise AlreadyExistsError(
                f"task {task_name!r} is already {task.state.value}", reason="TASK_EXISTS", metadata=about
            )
        if tasks.count() >= self.limits.max_tasks:
            raise ResourceExhaustedError(
                f"the server holds its maximum of {self.limits.max_tasks} tasks",
                reason="TASK_LIMIT",
                metadata={"max_tasks": str(self.limits.max_tasks)},
            )
        if submission.options.temporary:
            held = tasks.count_temporary()
            if held >= self.limits.max_temporary_tasks:
                raise ResourceExhaustedError(
                    f"header.mode: the server holds its maximum of {self.limits.max_temporary_tasks} temporary "
                    f"tasks ({held} learned or queued temporarily); commit or unlearn one first "
                    "(limits.max_temporary_tasks)",
                    reason="TEMPORARY_TASK_LIMIT",
                    metadata={"max_temporary_tasks": str(self.limits.max_temporary_tasks)},
                )
        self.check_queue(jobs)
        return None

    def submit_learn(
        self,
        job_id: str,
        submission: LearnSubmission,
        spool: FileRecord,
        samples: int,
        classes: Sequence[int],
        principal: str,
        *,
        sample_digests: Sequence[str] = (),
        server_made_ids: bool = True,
    ) -> Job:
        """Record a durably spooled Learn stream as a QUEUED job, in one transaction.

        Its samples enter the sample index (``sample_digests``, keyed digests in stream order; with
        ``server_made_ids`` they are those of ``<job id>/<index>``, and the job says so). On any
        failure the spool file is deleted, so nothing accepted-but-unrecorded lingers.
        """
        try:
            self.writable()
            with self.transaction() as session:
                # A retry racing its first attempt: the key decides, before the task name does.
                existing = self._matching(session, submission.idempotency_key, JobKind.LEARN, submission.task)
                existing = existing or self._check_learn(session, submission)
                if existing is not None:
                    self.blobs.delete(spool.path)
                    return existing
                self.lifecycle.new_task(
                    session, submission.task, samples, classes, temporary=submission.options.temporary
                )
                job = Job(
                    id=job_id,
                    kind=JobKind.LEARN,
                    task=submission.task,
                    idempotency_key=submission.idempotency_key or None,
                    principal=principal,
                    samples=samples,
                    bytes=spool.bytes,
                    created_at=utc_now(),
                )
                job.options = {**submission.options.as_dict(), "metadata": submission.metadata}
                if submission.options.temporary:
                    job.options = {**job.options, "ttl_seconds": submission.ttl_seconds}
                if server_made_ids:
                    job.options = {**job.options, "sample_id_prefix": server_made_id(job_id, 0)[:-1]}
                self.lifecycle.new_job(session, job)
                SampleRepository(session).add_stream(submission.task, job_id, sample_digests)
                DataFileRepository(session).add(
                    DataFile(
                        kind=DataFileKind.SPOOL,
                        task=submission.task,
                        job_id=job_id,
                        path=spool.path,
                        bytes=spool.bytes,
                        sha256=spool.sha256,
                    )
                )
                self.audit_log.append(
                    session,
                    principal=principal,
                    action="learn.requested",
                    task=submission.task,
                    job_id=job_id,
                    details={
                        "samples": samples,
                        "bytes": spool.bytes,
                        "sha256": spool.sha256,
                        "classes": sorted(int(c) for c in classes),
                        "options": submission.options.as_dict(),
                        "metadata": submission.metadata,
                        **({"ttl_seconds": submission.ttl_seconds} if submission.options.temporary else {}),
                    },
                )
        except IntegrityError:
            self.blobs.delete(spool.path)
            # Two requests with one idempotency key raced: the other one won; answer with its job.
            existing = self.existing_job(submission.idempotency_key, JobKind.LEARN, submission.task)
            if existing is not None:
                return existing
            raise AlreadyExistsError(
                f"task {submission.task!r} was created concurrently",
                reason="TASK_EXISTS",
                metadata={"task": submission.task},
            ) from None
        except BaseException:
            self.blobs.delete(spool.path)
            raise
        self.serving.set_task_state(submission.task, TaskState.LEARNING)
        self.events.notify()
        log.info(
            "learn job queued (%d samples)", samples, extra={"job_id": job_id, "task": job.task, "principal": principal}
        )
        return job

    # --------------------------------------------------------------- unlearn
    def submit_unlearn(self, submission: UnlearnSubmission, principal: str) -> Job:
        """Queue an unlearn, or forget at once a task whose data never reached the model.

        A task whose Learn job is still QUEUED has its job cancelled and its spool purged: the data
        never reaches the model and the returned unlearn job is already SUCCEEDED.
        """
        self.writable()
        existing = self.existing_job(submission.idempotency_key, JobKind.UNLEARN, submission.task)
        if existing is not None:
            return existing
        job_id = uuid.uuid4().hex
        # From acceptance on, Predict never answers from a model holding the task (DESIGN.md section 9):
        # held before the job row commits, so the worker cannot finish the job first.
        self.serving.hold(job_id, {submission.task})
        try:
            job, state, purged = self._queue_unlearn(submission, principal, job_id)
        except IntegrityError:
            self.serving.release(job_id)
            existing = self.existing_job(submission.idempotency_key, JobKind.UNLEARN, submission.task)
            if existing is not None:
                return existing
            raise
        except BaseException:
            self.serving.release(job_id)
            raise
        if job.id != job_id or job.state.terminal:  # an earlier request's job, or done at once
            self.serving.release(job_id)
        if job.id != job_id:
            return job
        self._delete_files(purged)
        self.serving.set_task_state(submission.task, state)
        self.events.notify()
        log.info("unlearn job %s", job.state.value, extra={"job_id": job.id, "task": job.task, "principal": principal})
        return job

    def _queue_unlearn(
        self, submission: UnlearnSubmission, principal: str, job_id: str
    ) -> tuple[Job, TaskState | None, list[str]]:
        """The transaction of :meth:`submit_unlearn`: (job, the task's new state, files to delete)."""
        purged: list[str] = []
        with self.transaction() as session:
            tasks, jobs = TaskRepository(session), JobRepository(session)
            task = tasks.get_for_update(submission.task)
            # A retry racing its first attempt (which holds the task row until it commits).
            existing = self._matching(session, submission.idempotency_key, JobKind.UNLEARN, submission.task)
            if existing is not None:
                return existing, None, []
            about = {"task": submission.task}
            if task is None:
                raise NotFoundError(f"task {submission.task!r} does not exist", reason="TASK_NOT_FOUND", metadata=about)
            if task.state == TaskState.UNLEARNED:
                raise FailedPreconditionError(
                    f"task {submission.task!r} is already unlearned", reason="TASK_UNLEARNED", metadata=about
                )
            if task.state == TaskState.UNLEARNING and any(
                jobs.list(task=submission.task, state=state, kind=JobKind.UNLEARN, limit=1)
                for state in (JobState.QUEUED, JobState.RUNNING)
            ):
                raise FailedPreconditionError(
                    f"task {submission.task!r} is already being unlearned", reason="TASK_UNLEARNING", metadata=about
                )
            method = self._unlearn_method(task, submission.method)
            # UNLEARNING with no active unlearn job: the previous attempt failed; this one retries.
            job = Job(
                id=job_id,
                kind=JobKind.UNLEARN,
                task=submission.task,
                method=method,
                idempotency_key=submission.idempotency_key or None,
                principal=principal,
                created_at=utc_now(),
            )
            job.options = {"reason": submission.reason}
            queued_learn = jobs.list(
                task=submission.task, state=JobState.QUEUED, kind=JobKind.LEARN, limit=1000, for_update=True
            )
            self.audit_log.append(
                session,
                principal=principal,
                action="unlearn.requested",
                task=submission.task,
                job_id=job.id,
                details={"reason": submission.reason, "method": submission.method},
            )
            if task.learned_version is None and queued_learn:
                # The data never reached the model: cancel the learn, purge its spool, done.
                self.lifecycle.task_unlearned(session, task)
                for learn in queued_learn:
                    purged += self.lifecycle.cancel(session, learn, principal, "cancelled by an unlearn of its task")
                job.model_version = self.serving.predictor.version if self.serving.predictor else 0
                job.message = "the task's data never reached the model; its learn job was cancelled"
                self.lifecycle.new_job(session, job, JobState.SUCCEEDED)
                self.audit_log.append(
                    session,
                    principal=principal,
                    action="unlearn.succeeded",
                    task=submission.task,
                    job_id=job.id,
                    details={"model_version": job.model_version, "reached_model": False},
                )
            else:
                self.check_queue(jobs)
                # A queued commit of a temporary task is moot: the task is being forgotten.
                for commit in jobs.list(
                    task=submission.task, state=JobState.QUEUED, kind=JobKind.COMMIT, limit=1000, for_update=True
                ):
                    purged += self.lifecycle.cancel(session, commit, principal, "cancelled by an unlearn of its task")
                self.lifecycle.task_unlearning(session, task)
                self.lifecycle.new_job(session, job)
            return job, task.state, purged

    @staticmethod
    def _unlearn_method(task: Task, method: str) -> str:
        """The method an unlearn of ``task`` runs: a temporary task's side network is deleted, whatever else."""
        if task.temporary:  # learned temporarily, or its temporary learn still queued
            if method and method != FORGET_METHOD:
                raise FailedPreconditionError(
                    f"method: task {task.name!r} is temporary; it is forgotten exactly by deleting its side "
                    f"network ({FORGET_METHOD!r}); leave method empty",
                    reason="METHOD_UNSUPPORTED",
                    metadata={"method": method[:64], "supported": FORGET_METHOD},
                )
            return FORGET_METHOD
        if method == FORGET_METHOD:
            raise FailedPreconditionError(
                f"method: {FORGET_METHOD!r} applies only to temporary tasks; task {task.name!r} is {task.state.value}",
                reason="METHOD_UNSUPPORTED",
                metadata={"method": method, "task": task.name},
            )
        return method

    # ---------------------------------------------------------------- commit
    def submit_commit(self, submission: CommitSubmission, principal: str) -> Job:
        """Queue the COMMIT of a TEMPORARY task (its side network distilled into the main model).

        Raises:
            NotFoundError: no such task.
            FailedPreconditionError: the task is not TEMPORARY (never learned temporarily, already
                committed, being learned or unlearned), or a commit of it is already queued or running.
            ResourceExhaustedError: the queue is full.
        """
        self.writable()
        existing = self.existing_job(submission.idempotency_key, JobKind.COMMIT, submission.task)
        if existing is not None:
            return existing
        try:
            with self.transaction() as session:
                tasks, jobs = TaskRepository(session), JobRepository(session)
                task = tasks.get_for_update(submission.task)
                existing = self._matching(session, submission.idempotency_key, JobKind.COMMIT, submission.task)
                if existing is not None:
                    return existing
                about = {"task": submission.task}
                if task is None:
                    raise NotFoundError(
                        f"task {submission.task!r} does not exist", reason="TASK_NOT_FOUND", metadata=about
                    )
                if task.state != TaskState.TEMPORARY:
                    hint = {
                        TaskState.LEARNING: "its learn has not finished; commit it once the task is TEMPORARY"
                        if task.temporary
                        else "it is being learned permanently",
                        TaskState.LEARNED: "it is learned permanently already (only a TEMPORARY task can be committed)",
                    }.get(task.state, "only a TEMPORARY task can be committed")
                    raise FailedPreconditionError(
                        f"task: {submission.task!r} is {task.state.value}, not temporary: {hint}",
                        reason="TASK_NOT_TEMPORARY",
                        metadata={**about, "state": task.state.value},
                    )
                active = [
                    j
                    for state in (JobState.QUEUED, JobState.RUNNING)
                    for j in jobs.list(task=submission.task, state=state, kind=JobKind.COMMIT, limit=1)
                ]
                if active:
                    raise FailedPreconditionError(
                        f"task: {submission.task!r} is already being committed (job {active[0].id})",
                        reason="TASK_COMMITTING",
                        metadata={**about, "job_id": active[0].id},
                    )
                self.check_queue(jobs)
                job = Job(
                    id=uuid.uuid4().hex,
                    kind=JobKind.COMMIT,
                    task=submission.task,
                    idempotency_key=submission.idempotency_key or None,
                    principal=principal,
                    samples=task.samples,
                    created_at=utc_now(),
                )
                job.options = {}
                self.lifecycle.new_job(session, job)
                self.audit_log.append(
                    session,
                    principal=principal,
                    action="commit.requested",
                    task=submission.task,
                    job_id=job.id,
                    details={"learned_version": task.learned_version},
                )
        except IntegrityError:
            existing = self.existing_job(submission.idempotency_key, JobKind.COMMIT, submission.task)
            if existing is not None:
                return existing
            raise
        self.events.notify()
        log.info("commit job queued", extra={"job_id": job.id, "task": job.task, "principal": principal})
        return job

    # ---------------------------------------------------------------- expiry
    def expired_temporary(self, now: datetime) -> list[str]:
        """TEMPORARY tasks whose time to live has passed, oldest expiry first."""
        with self.sessions() as session:
            return [t.name for t in TaskRepository(session).expired_temporary(now)]

    def check_queue(self, jobs: JobRepository) -> None:
        """Refuse a new job while the queue is full."""
        if jobs.count_queued() >= self.limits.max_queued_jobs:
            raise ResourceExhaustedError(
                f"the job queue is full ({self.limits.max_queued_jobs} queued jobs); retry later",
                reason="QUEUE_FULL",
                retry_after=QUEUE_FULL_RETRY_SECONDS,
                metadata={"max_queued_jobs": str(self.limits.max_queued_jobs)},
            )

    # ---------------------------------------------------------------- cancel
    def cancel(self, job_id: str, principal: str) -> Job:
        """Cancel a QUEUED job at once, or a RUNNING learn at its next training step.

        A running learn stops cooperatively; this waits (``cancel_wait_seconds``) until it has, and
        the model is then exactly as before the job. A running unlearn is refused: forgetting, once
        started, finishes.

        Raises:
            NotFoundError: no such job.
            FailedPreconditionError: the job has ended, or is a running unlearn.
        """
        self.writable()
        purged: list[str] = []
        with self.transaction() as session:
            job = JobRepository(session).get_for_update(job_id)  # the worker cannot claim it meanwhile
            if job is None:
                raise NotFoundError(
                    f"job {job_id!r} does not exist", reason="JOB_NOT_FOUND", metadata={"job_id": job_id}
                )
            running = job.state == JobState.RUNNING
            if running and job.kind == JobKind.UNLEARN:
                raise FailedPreconditionError(
                    f"job {job_id} is a running unlearn; forgetting, once started, finishes and cannot be cancelled",
                    reason="UNLEARN_RUNNING",
                    metadata={"job_id": job_id},
                )
            if not running and job.state != JobState.QUEUED:
                raise FailedPreconditionError(
                    f"job {job_id} is {job.state.value}; only queued or running jobs can be cancelled",
                    reason="JOB_ENDED",
                    metadata={"job_id": job_id, "state": job.state.value},
                )
            if not running:
                purged = self.lifecycle.cancel(session, job, principal, "cancelled on request")
                task = TaskRepository(session).get(job.task)
                new_state = task.state if task is not None else None
        if running:
            return self._cancel_running(job_id, principal)
        self.serving.release(job_id)
        self._delete_files(purged)
        self.serving.set_task_state(job.task, new_state)
        self.events.notify()
        return job

    def _cancel_running(self, job_id: str, principal: str) -> Job:
        self.events.request_cancel(job_id, principal)
        deadline = time.monotonic() + self.limits.cancel_wait_seconds
        seen = self.events.counter
        job = self.get_job(job_id)
        while not job.state.terminal and time.monotonic() < deadline and not self.events.closed:
            seen = self.events.wait(seen, timeout=min(1.0, max(deadline - time.monotonic(), 0.0)))
            job = self.get_job(job_id)
        if job.state.terminal:
            self.events.discard_cancel(job_id)
        if job.state == JobState.SUCCEEDED:
            raise FailedPreconditionError(
                f"job {job_id} finished before it could be cancelled",
                reason="JOB_ENDED",
                metadata={"job_id": job_id, "state": job.state.value},
            )
        return job

    def _delete_files(self, paths: Sequence[str]) -> None:
        for path in paths:
            self.blobs.delete(path)

    # --------------------------------------------------------------- queries
    def get_job(self, job_id: str) -> Job:
        """A job by id, with live progress if it is running.

        A job that has ended is returned once the worker is done with it: its superseded files
        deleted, its metrics published (at most :data:`_SETTLE_SECONDS` later).
        """
        with self.sessions() as session:
            job = JobRepository(session).get(job_id)
        if job is not None and job.state.terminal and not self.events.wait_settled(job.id, _SETTLE_SECONDS):
            log.warning("job %s ended but the worker has not finished deleting its files yet", job.id)
        if job is None:
            raise NotFoundError(f"job {job_id!r} does not exist", reason="JOB_NOT_FOUND", metadata={"job_id": job_id})
        live = self.events.progress(job.id)
        if live is not None and job.state == JobState.RUNNING:
            job.progress, job.message = live.fraction, live.message
        return job

    def list_jobs(self, state: JobState | None, task: str | None, after_seq: int, limit: int) -> list[Job]:
        """Jobs in ``seq`` order after ``after_seq`` (ended ones once settled, as :meth:`get_job`)."""
        with self.sessions() as session:
            jobs = JobRepository(session).list(state=state, task=task, after_seq=after_seq, limit=limit)
        for job in jobs:
            if job.state.terminal:
                self.events.wait_settled(job.id, _SETTLE_SECONDS)
        return jobs

    def get_task(self, name: str) -> Task:
        """A task by name."""
        with self.sessions() as session:
            task = TaskRepository(session).get(name)
        if task is None:
            raise NotFoundError(f"task {name!r} does not exist", reason="TASK_NOT_FOUND", metadata={"task": name})
        return task

    def list_tasks(self, state: TaskState | None) -> list[Task]:
        """Every task, optionally only those in ``state``."""
        with self.sessions() as session:
            return TaskRepository(session).list(state=state)

    def list_evaluations(self, after_job_seq: int, limit: int) -> list[EvaluationRow]:
        """Rows of the accuracy matrix, oldest first."""
        with self.sessions() as session:
            return EvaluationRepository(session).matrix(after_job_seq=after_job_seq, limit=limit)

    def queue_depth(self) -> int:
        """Number of QUEUED jobs (read by the metrics endpoint at scrape time)."""
        with self.sessions() as session:
            return JobRepository(session).count_queued()

    def list_audit(self, after_seq: int, limit: int, task: str | None) -> list[AuditEvent]:
        """Audit events in chain order after ``after_seq``."""
        with self.sessions() as session:
            return self.audit_log.list(session, after_seq=after_seq, limit=limit, task=task)

    def audit(self, principal: str, action: str, task: str = "", job_id: str = "", **details: object) -> None:
        """Append one audit event in its own transaction."""
        with self.transaction() as session:
            self.audit_log.append(
                session, principal=principal, action=action, task=task, job_id=job_id, details=details
            )
