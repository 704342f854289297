"""Evaluation repository: the accuracy matrix (one row per successful job)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from server.storage.enums import JobKind, JobState
from server.storage.models import Evaluation, Job


@dataclass(frozen=True)
class EvaluationRow:
    """One row of the accuracy matrix: the model right after one successful job.

    Attributes:
        job_seq: The job's queue position (the paging cursor).
        job_id: The job's public id.
        kind: What the job did.
        task: The task the job learned or unlearned.
        model_version: Model version the job produced.
        accuracies: Task name → accuracy (%) on its probe set after the job; tasks without a
            probe set are absent (possibly all of them).
        metrics: The job's numeric metrics (spill, MIA, unlearning time, ...).
        finished_at: When the job finished.
    """

    job_seq: int
    job_id: str
    kind: JobKind
    task: str
    model_version: int
    accuracies: dict[str, float]
    metrics: dict[str, float]
    finished_at: datetime | None


class EvaluationRepository:
    """Reads and writes :class:`Evaluation` rows inside the caller's transaction (never commits).

    Args:
        session: The session whose transaction the caller owns.
    """

    def __init__(self, session: Session) -> None:
        self.session = session

    def add_rows(self, job_seq: int, accuracies: Mapping[str, float]) -> list[Evaluation]:
        """Records the accuracy (%) of every evaluated task after job ``job_seq`` (flushed).

        Raises:
            sqlalchemy.exc.IntegrityError: If the job does not exist or a task was already
                recorded for it.
        """
        rows = [
            Evaluation(job_seq=job_seq, task=task, accuracy=float(accuracy)) for task, accuracy in accuracies.items()
        ]
        self.session.add_all(rows)
        self.session.flush()
        return rows

    def for_job(self, job_seq: int) -> dict[str, float]:
        """Returns task → accuracy (%) recorded after job ``job_seq`` (empty if none)."""
        statement = select(Evaluation.task, Evaluation.accuracy).where(Evaluation.job_seq == job_seq)
        return {task: float(accuracy) for task, accuracy in self.session.execute(statement)}

    def last_evaluated_job(self) -> Job | None:
        """The successful job with evaluation rows that was applied last (execution order).

        Jobs run out of submission order (unlearns first), so "last" is the highest model version,
        then the latest finish, not the highest ``seq``.
        """
        statement = (
            select(Job)
            .where(Job.state == JobState.SUCCEEDED, Job.seq.in_(select(Evaluation.job_seq)))
            .order_by(Job.model_version.desc(), Job.finished_at.desc(), Job.seq.desc())
            .limit(1)
        )
        return self.session.scalars(statement).one_or_none()

    def latest_accuracies(self) -> dict[str, float]:
        """Returns task → accuracy (%) after the last applied successful job that has evaluation rows.

        This is ``a_{u-1}`` when called before the current job's rows are added (spill needs it).
        Empty when no job has been evaluated yet.
        """
        newest = self.last_evaluated_job()
        return {} if newest is None else self.for_job(newest.seq)

    def matrix(self, after_job_seq: int = 0, limit: int = 100) -> list[EvaluationRow]:
        """Returns the accuracy matrix, oldest job first, one row per SUCCEEDED job.

        A successful job without evaluation rows still gets a row (empty ``accuracies``), so the
        matrix has no holes in its job axis.

        Args:
            after_job_seq: Only jobs with ``seq`` greater than this (the paging cursor).
            limit: At most this many rows (at least 1).

        Raises:
            ValueError: If ``limit`` is less than 1.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        jobs = list(
            self.session.scalars(
                select(Job)
                .where(Job.state == JobState.SUCCEEDED, Job.seq > after_job_seq)
                .order_by(Job.seq)
                .limit(limit)
            )
        )
        if not jobs:
            return []
        accuracies: dict[int, dict[str, float]] = {job.seq: {} for job in jobs}
        cells = select(Evaluation.job_seq, Evaluation.task, Evaluation.accuracy).where(
            Evaluation.job_seq.in_(accuracies.keys())
        )
        for job_seq, task, accuracy in self.session.execute(cells.order_by(Evaluation.job_seq, Evaluation.task)):
            accuracies[job_seq][task] = float(accuracy)
        return [
            EvaluationRow(
                job_seq=job.seq,
                job_id=job.id,
                kind=job.kind,
                task=job.task,
                model_version=job.model_version,
                accuracies=accuracies[job.seq],
                metrics=job.metrics,
                finished_at=job.finished_at,
            )
            for job in jobs
        ]
