"""What the commit phase measured before opening its transaction."""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.protocol import Predictor
from server.jobs.evaluation import ProbeSet


@dataclass(frozen=True)
class Evaluated:
    """The model after a job, evaluated on every probe set.

    Attributes:
        predictor: the snapshot that was evaluated (published once the job commits).
        accuracies: task → accuracy (%) now, a_u.
        previous: task → accuracy (%) after the job applied before this one, a_{u-1} (execution order).
        probes: task → probe set.
        task_incremental: whether the model answers per task (else one class-incremental head).
    """

    predictor: Predictor
    accuracies: dict[str, float]
    previous: dict[str, float]
    probes: dict[str, ProbeSet]
    task_incremental: bool
