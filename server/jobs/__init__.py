"""The durable job queue and the single worker thread that owns the training model."""

from server.jobs.context import JobContext, WorkerSettings
from server.jobs.events import JobEvents
from server.jobs.ingest import LearnStream
from server.jobs.lifecycle import IllegalTransitionError, Lifecycle, on_outcome_commit
from server.jobs.recovery import StateMismatchError
from server.jobs.service import JobService, LearnSubmission, QueueLimits, UnlearnSubmission
from server.jobs.serving import ServingState
from server.jobs.worker import Worker

__all__ = [
    "IllegalTransitionError",
    "JobContext",
    "JobEvents",
    "JobService",
    "LearnStream",
    "LearnSubmission",
    "Lifecycle",
    "QueueLimits",
    "ServingState",
    "StateMismatchError",
    "UnlearnSubmission",
    "Worker",
    "WorkerSettings",
    "on_outcome_commit",
]
