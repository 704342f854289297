"""One handler per job kind, behind one small protocol, looked up in one table.

A job runs in two phases (see :mod:`server.jobs.worker`): :meth:`JobHandler.compute` changes the
model; the commit phase (:mod:`server.jobs.finish`) calls :meth:`JobHandler.measure` before it
opens its transaction (model work only, no locks held) and :meth:`JobHandler.commit` inside it.
A new job kind is a new module here and one line in :data:`HANDLERS`.
"""

from __future__ import annotations

from typing import Protocol

from sqlalchemy.orm import Session

from server.jobs.context import JobContext, JobRun
from server.jobs.kinds.commit import CommitHandler
from server.jobs.kinds.forget_samples import ForgetSamplesHandler
from server.jobs.kinds.learn import LearnHandler
from server.jobs.kinds.unlearn import UnlearnHandler
from server.jobs.snapshot import Evaluated
from server.storage import Job, JobKind


class JobHandler(Protocol):
    """What the worker and the commit phase need from a job kind."""

    #: Whether a RUNNING job of this kind may be cancelled (forgetting, once started, finishes).
    cancellable: bool

    def compute(self, ctx: JobContext, run: JobRun) -> dict[str, float] | None:
        """Change the model; return the job's metrics, or None when the model did not change."""
        ...

    def measure(self, ctx: JobContext, run: JobRun, evaluated: Evaluated) -> dict[str, float]:
        """Model-only measurements of the finished computation, taken before the commit transaction."""
        ...

    def commit(self, ctx: JobContext, session: Session, run: JobRun, job: Job, evaluated: Evaluated) -> list[str]:
        """Kind-specific rows of the commit transaction; return paths to delete after it commits."""
        ...


#: The handler of every job kind this server runs.
HANDLERS: dict[JobKind, JobHandler] = {
    JobKind.LEARN: LearnHandler(),
    JobKind.UNLEARN: UnlearnHandler(),
    JobKind.COMMIT: CommitHandler(),
}
#: UNLEARN jobs that name sample ids (records-level forgetting) run here instead.
FORGET_SAMPLES: JobHandler = ForgetSamplesHandler()


def handler_for(job: Job) -> JobHandler:
    """The handler of ``job``: by its kind, and for an UNLEARN by whether it names samples.

    Raises:
        NotImplementedError: no handler is registered for the job's kind (the job fails, naming it).
    """
    if job.kind == JobKind.UNLEARN and job.options.get("sample_ids"):
        return FORGET_SAMPLES
    try:
        return HANDLERS[job.kind]
    except KeyError:
        raise NotImplementedError(f"job kind {job.kind.value} is not supported by this server") from None


__all__ = ["FORGET_SAMPLES", "HANDLERS", "JobHandler", "handler_for"]
