"""Job repository: the durable queue's storage."""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.storage.column_types import utc_now
from server.storage.enums import JobKind, JobState
from server.storage.models import Job


class JobRepository:
    """Reads and writes :class:`Job` rows inside the caller's transaction (never commits).

    Args:
        session: The session whose transaction the caller owns.
        clock: Source of ``created_at``.
    """

    def __init__(self, session: Session, clock: Callable[[], datetime] = utc_now) -> None:
        self.session = session
        self.clock = clock

    def get(self, job_id: str) -> Job | None:
        """Returns the job with public id ``job_id``, or ``None``."""
        return self.session.scalars(select(Job).where(Job.id == job_id)).one_or_none()

    def get_for_update(self, job_id: str) -> Job | None:
        """Returns the job with its row locked until the transaction ends (refreshed from the database)."""
        statement = select(Job).where(Job.id == job_id).with_for_update().execution_options(populate_existing=True)
        return self.session.scalars(statement).one_or_none()

    def by_idempotency_key(self, key: str) -> Job | None:
        """Returns the job created with ``key``, or ``None``."""
        return self.session.scalars(select(Job).where(Job.idempotency_key == key)).one_or_none()

    def add(self, job: Job) -> Job:
        """Inserts a new job (flushed: ``seq`` is assigned, constraint violations raise here).

        Assigns ``id`` (32 hex digits, uuid4) and ``created_at`` unless set.

        Raises:
            sqlalchemy.exc.IntegrityError: If the idempotency key or id is taken. On PostgreSQL
                the transaction is then aborted (the job service answers with the winner's job).
        """
        if not job.id:
            job.id = uuid.uuid4().hex
        if job.created_at is None:
            job.created_at = self.clock()
        self.session.add(job)
        self.session.flush()
        return job

    def list(
        self,
        state: JobState | None = None,
        task: str | None = None,
        after_seq: int = 0,
        limit: int = 100,
        *,
        kind: JobKind | None = None,
        for_update: bool = False,
    ) -> builtins.list[Job]:
        """Returns jobs in queue order (``seq`` ascending), filtered and paged.

        Args:
            state: Only jobs in this state.
            task: Only jobs of this task.
            after_seq: Only jobs with ``seq`` greater than this (the paging cursor).
            limit: At most this many jobs (at least 1).
            kind: Only jobs of this kind.
            for_update: Lock the rows (PostgreSQL ``FOR UPDATE``) until the transaction ends.

        Raises:
            ValueError: If ``limit`` is less than 1.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        statement = select(Job).where(Job.seq > after_seq).order_by(Job.seq).limit(limit)
        if state is not None:
            statement = statement.where(Job.state == state)
        if task is not None:
            statement = statement.where(Job.task == task)
        if kind is not None:
            statement = statement.where(Job.kind == kind)
        if for_update:
            statement = statement.with_for_update()
        return builtins.list(self.session.scalars(statement))

    def next_runnable(self) -> Job | None:
        """Returns the job the worker should run next, or ``None`` when nothing is queued.

        The oldest queued unlearn job comes first (a right-to-be-forgotten request does not wait
        behind a backlog of learning), then the oldest queued job of any kind.
        """
        # SKIP LOCKED: a job locked by a concurrent cancel or unlearn is not claimed under it; once that
        # transaction commits the job is no longer QUEUED (or is claimed on the next pass).
        queued = (
            select(Job).where(Job.state == JobState.QUEUED).order_by(Job.seq).limit(1).with_for_update(skip_locked=True)
        )
        unlearn = self.session.scalars(queued.where(Job.kind == JobKind.UNLEARN)).one_or_none()
        if unlearn is not None:
            return unlearn
        return self.session.scalars(queued).one_or_none()

    def count_queued(self, kind: JobKind | None = None) -> int:
        """Returns the number of queued jobs (the queue depth), optionally of one kind."""
        statement = select(func.count()).select_from(Job).where(Job.state == JobState.QUEUED)
        if kind is not None:
            statement = statement.where(Job.kind == kind)
        return int(self.session.scalar(statement) or 0)

    def last_succeeded(self) -> Job | None:
        """Returns the newest SUCCEEDED job (by ``seq``), or ``None``."""
        statement = select(Job).where(Job.state == JobState.SUCCEEDED).order_by(Job.seq.desc()).limit(1)
        return self.session.scalars(statement).one_or_none()

    def max_model_version(self) -> int:
        """Returns the highest model version any SUCCEEDED job produced (0 when none)."""
        statement = select(func.max(Job.model_version)).where(Job.state == JobState.SUCCEEDED)
        return int(self.session.scalar(statement) or 0)

    def running(self) -> builtins.list[Job]:
        """Returns the jobs marked RUNNING, oldest first (after a crash: the ones to reconcile)."""
        return builtins.list(self.session.scalars(select(Job).where(Job.state == JobState.RUNNING).order_by(Job.seq)))
