"""The states and kinds stored in the database.

Values are the lowercase strings written to SQL; member names match the ``lethe.v1`` proto enums,
so ``pb.JobState.Value(state.name)`` converts at the RPC edge.
"""

from __future__ import annotations

from enum import StrEnum


class TaskState(StrEnum):
    """Lifecycle of a task."""

    LEARNING = "learning"
    LEARNED = "learned"
    TEMPORARY = "temporary"
    UNLEARNING = "unlearning"
    UNLEARNED = "unlearned"


class JobKind(StrEnum):
    """What a job does to the model."""

    LEARN = "learn"
    UNLEARN = "unlearn"
    COMMIT = "commit"


class JobState(StrEnum):
    """Lifecycle of a job; SUCCEEDED, FAILED and CANCELLED are terminal."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Whether a job in this state will never change again."""
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class DataFileKind(StrEnum):
    """Why the server keeps a file under its data directory."""

    SPOOL = "spool"
    PROBE = "probe"
    RETAINED = "retained"
    MEMBER = "member"
    CHECKPOINT = "checkpoint"
