"""The durable job queue and the single worker thread that owns the training model."""

from server.jobs.events import JobEvents
from server.jobs.service import JobService, LearnSubmission, QueueLimits, UnlearnSubmission
from server.jobs.serving import ServingState
from server.jobs.worker import StateMismatchError, Worker, WorkerSettings

__all__ = [
    "JobEvents",
    "JobService",
    "LearnSubmission",
    "QueueLimits",
    "ServingState",
    "StateMismatchError",
    "UnlearnSubmission",
    "Worker",
    "WorkerSettings",
]
