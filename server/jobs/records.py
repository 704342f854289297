"""Records-level right to be forgotten at the front door: locate a person's samples, queue their forgetting.

A client names samples by the ids its Learn streams carried (or the server-made ``<job>/<i>``
ones). Both calls hash the ids with the server's key and look the digests up in the sample index;
the ids themselves are never stored. A records unlearn is one UNLEARN job whose options say how
many ids it forgets and in which tasks; it claims the index rows, so two requests never forget the
same sample twice, and its handler (:mod:`server.jobs.kinds.forget_samples`) does the work.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from server.errors import FailedPreconditionError, NotFoundError
from server.jobs.service import JobService
from server.storage import (
    Job,
    JobKind,
    JobRepository,
    JobState,
    Sample,
    SampleRepository,
    TaskRepository,
    TaskState,
    utc_now,
)

log = logging.getLogger(__name__)

#: Unknown ids quoted in a NOT_FOUND message.
_QUOTED = 5


@dataclass(frozen=True)
class ForgetSamplesSubmission:
    """A validated records unlearn: distinct ids, an optional task, the request's other fields."""

    sample_ids: tuple[str, ...]
    task: str
    reason: str
    idempotency_key: str
    method: str


@dataclass(frozen=True)
class Located:
    """Where given sample ids live: task -> how many, and how many no task holds."""

    tasks: dict[str, int]
    unknown: int


class SampleRequests:
    """LocateSamples and records unlearns, over the job service's database and serving state.

    Args:
        jobs: the job service (transactions, lifecycle, audit log, serving state, sample key).
        refusal: why this model cannot forget individual samples (None when it can): the strategy's
            ``sample_forgetting()`` answer, naming what would work.
        default_method: the strategy's default unlearn method, the one records forgetting runs.
    """

    def __init__(self, jobs: JobService, refusal: str | None, default_method: str) -> None:
        self.jobs = jobs
        self.refusal = refusal
        self.default_method = default_method

    def locate(self, sample_ids: Sequence[str], principal: str) -> Located:
        """Which tasks hold these ids (audited: who asked, how many ids, what was found)."""
        digests = set(self.jobs.sample_key.digests(sample_ids))
        with self.jobs.transaction() as session:
            rows = SampleRepository(session).find(digests)
            tasks = dict(Counter(row.task for row in rows))
            found = len({row.digest for row in rows})
            self.jobs.audit_log.append(
                session,
                principal=principal,
                action="samples.located",
                details={"ids": len(digests), "tasks": tasks, "unknown": len(digests) - found},
            )
        return Located(tasks, len(digests) - found)

    def submit(self, submission: ForgetSamplesSubmission, principal: str) -> Job:
        """Queue one UNLEARN job forgetting these samples wherever they were learned.

        Raises:
            FailedPreconditionError: this model cannot forget samples, ``method`` is not the one that
                can, a task holding some is being unlearned, or some are already being forgotten by
                another job.
            NotFoundError: some ids are in no task (or not in ``task``); nothing is queued.
        """
        if self.refusal is not None:
            raise FailedPreconditionError(f"sample_ids: {self.refusal}", reason="SAMPLE_FORGETTING_UNSUPPORTED")
        if submission.method and submission.method != self.default_method:
            raise FailedPreconditionError(
                f"method: {submission.method!r} cannot forget individual samples; leave it empty "
                f"(records are forgotten with {self.default_method!r})",
                reason="METHOD_UNSUPPORTED",
                metadata={"method": submission.method[:64], "supported": self.default_method},
            )
        self.jobs.writable()
        existing = self.jobs.existing_job(submission.idempotency_key, JobKind.UNLEARN, submission.task)
        if existing is not None:
            return existing
        digests = dict(zip(self.jobs.sample_key.digests(submission.sample_ids), submission.sample_ids, strict=True))
        job_id = uuid.uuid4().hex
        with self.jobs.transaction() as session:
            rows = SampleRepository(session).find(set(digests), submission.task or None)
            self._check_found(digests, rows, submission.task)
            earlier = self._claimed_elsewhere(session, rows)
            if earlier is not None:
                return earlier
            tasks = dict(Counter(row.task for row in rows))
            self._check_tasks(session, tasks)
            self.jobs.check_queue(JobRepository(session))
            # Held before the job row commits: from acceptance on, never answer from a model holding them.
            self.jobs.serving.hold(job_id, set(tasks))
            try:
                job = self._new_job(session, submission, principal, job_id, rows, tasks)
            except BaseException:
                self.jobs.serving.release(job_id)
                raise
        self.jobs.events.notify()
        log.info("records unlearn queued (%d samples in %d tasks)", len(rows), len(tasks), extra={"job_id": job.id})
        return job

    @staticmethod
    def _check_found(digests: dict[str, str], rows: Sequence[Sample], task: str) -> None:
        found = {row.digest for row in rows}
        unknown = [sample_id for digest, sample_id in digests.items() if digest not in found]
        if unknown:
            where = f"in task {task!r}" if task else "in any task"
            quoted = ", ".join(repr(i[:64]) for i in unknown[:_QUOTED])
            raise NotFoundError(
                f"sample_ids: {len(unknown)} of {len(digests)} ids are not held {where} (never learned, already "
                f"forgotten, or in a task that was unlearned), e.g. {quoted}; nothing was queued",
                reason="SAMPLES_NOT_FOUND",
                metadata={"unknown": str(len(unknown)), "requested": str(len(digests))},
            )

    @staticmethod
    def _claimed_elsewhere(session: Session, rows: Sequence[Sample]) -> Job | None:
        """The job already forgetting all of these samples (a repeated request), or None if none is."""
        claims = {row.forget_job_id for row in rows if row.forget_job_id is not None}
        if not claims:
            return None
        if len(claims) == 1 and all(row.forget_job_id is not None for row in rows):
            return JobRepository(session).get(claims.pop())
        busy = sum(1 for row in rows if row.forget_job_id is not None)
        raise FailedPreconditionError(
            f"sample_ids: {busy} of these samples are already being forgotten by job(s) "
            f"{', '.join(sorted(claims))}; wait for them to end, then send the rest",
            reason="SAMPLES_BEING_FORGOTTEN",
            metadata={"job_ids": ",".join(sorted(claims))},
        )

    @staticmethod
    def _check_tasks(session: Session, tasks: dict[str, int]) -> None:
        repository = TaskRepository(session)
        for name in sorted(tasks):
            task = repository.get_for_update(name)
            if task is None:
                continue
            if task.state == TaskState.UNLEARNING:
                raise FailedPreconditionError(
                    f"sample_ids: task {name!r} is being unlearned as a whole; its samples go with it",
                    reason="TASK_UNLEARNING",
                    metadata={"task": name},
                )
            if task.temporary:
                raise FailedPreconditionError(
                    f"sample_ids: task {name!r} is temporary (held by a side network): unlearn the whole task, "
                    "which is exact and instant, and learn the remaining samples again",
                    reason="TASK_TEMPORARY",
                    metadata={"task": name},
                )
            if task.samples - tasks[name] < 2:
                raise FailedPreconditionError(
                    f"sample_ids: these are {tasks[name]} of the {task.samples} samples of task {name!r}; "
                    "unlearn the whole task instead",
                    reason="TASK_WOULD_BE_EMPTY",
                    metadata={"task": name},
                )

    def _new_job(
        self,
        session: Session,
        submission: ForgetSamplesSubmission,
        principal: str,
        job_id: str,
        rows: Sequence[Sample],
        tasks: dict[str, int],
    ) -> Job:
        job = Job(
            id=job_id,
            kind=JobKind.UNLEARN,
            task=submission.task,
            method=submission.method,
            idempotency_key=submission.idempotency_key or None,
            principal=principal,
            samples=len(rows),
            created_at=utc_now(),
        )
        # The request's fingerprint names it in the proof without naming any id.
        fingerprint = hashlib.sha256("".join(sorted(row.digest for row in rows)).encode()).hexdigest()
        job.options = {"reason": submission.reason, "sample_ids": len(rows), "tasks": tasks, "request": fingerprint}
        self.jobs.lifecycle.new_job(session, job, JobState.QUEUED)
        SampleRepository(session).claim([row.id for row in rows], job_id)
        self.jobs.audit_log.append(
            session,
            principal=principal,
            action="unlearn.requested",
            task=submission.task,
            job_id=job_id,
            details={"reason": submission.reason, "samples": len(rows), "tasks": tasks, "request": fingerprint},
        )
        return job
