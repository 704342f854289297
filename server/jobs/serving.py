"""What Predict reads: the published model snapshot and the task states, both swapped atomically."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from server.engine.protocol import Predictor
from server.storage.enums import TaskState

#: Builds a serving snapshot of a model that never saw the given tasks' data (None when there is none).
Rollback = Callable[[Collection[str]], Predictor | None]


@dataclass(frozen=True)
class Answering:
    """What Predict answers from right now.

    Attributes:
        predictor: the snapshot to use, or None when no model free of data being forgotten exists
            (Predict is refused until the unlearn ends).
        forgetting: tasks with an accepted, unfinished Unlearn (task or samples), mapped to the job.
    """

    predictor: Predictor | None
    forgetting: Mapping[str, str]


class ServingState:
    """The current serving snapshot and an in-memory copy of every task's state.

    Predict must never touch SQL or wait for training: the worker publishes a new immutable
    predictor after each job (one reference swap), and every committed task-state change is
    mirrored here right after its transaction.
    """

    def __init__(self) -> None:
        self._predictor: Predictor | None = None
        self._tasks: dict[str, TaskState] = {}
        self._lock = threading.RLock()  # a rollback may read task states while holds are rebuilt
        #: Accepted, unfinished unlearns: job id -> the tasks whose data it forgets.
        self._holds: dict[str, frozenset[str]] = {}
        self._held: Answering | None = None
        self._rollback: Rollback | None = None

    @property
    def predictor(self) -> Predictor | None:
        """The published snapshot (the newest committed model), or None before the model is loaded."""
        return self._predictor

    def publish(self, predictor: Predictor) -> None:
        """Swap in a new snapshot; in-flight predictions keep using the one they started with."""
        self._predictor = predictor

    def answering(self) -> Answering:
        """What Predict uses: the published model, or the rollback point while an unlearn is unfinished.

        Task-incremental models (no rollback set) keep answering from the published model for every
        task but those being forgotten, which Predict refuses.
        """
        held = self._held
        if held is None:
            return Answering(self._predictor, {})
        if self._rollback is None:
            return Answering(self._predictor, held.forgetting)
        return held

    def set_rollback(self, rollback: Rollback | None) -> None:
        """Class-incremental models: how to build a model free of given tasks' data (it may return None).

        Without one (task-incremental models) the tasks being forgotten are refused instead.
        """
        self._rollback = rollback

    def hold(self, job_id: str, tasks: Collection[str]) -> None:
        """From now until :meth:`release`, never answer from a model holding data of ``tasks``.

        Called before the unlearn's job row commits, so the worker cannot finish it first.
        """
        with self._lock:
            self._holds[job_id] = frozenset(tasks)
            self._rebuild()

    def release(self, job_id: str) -> None:
        """The unlearn ended (after its model, if any, was published): answer from the published model."""
        with self._lock:
            if self._holds.pop(job_id, None) is not None:
                self._rebuild()

    def _rebuild(self) -> None:
        if not self._holds:
            self._held = None
            return
        forgetting = {task: job for job, tasks in self._holds.items() for task in tasks}
        predictor = self._rollback(set(forgetting)) if self._rollback is not None else None
        self._held = Answering(predictor, forgetting)

    def task_state(self, task: str) -> TaskState | None:
        """The task's state, or None for an unknown task."""
        with self._lock:
            return self._tasks.get(task)

    def task_states(self) -> dict[str, TaskState]:
        """A copy of every task's state."""
        with self._lock:
            return dict(self._tasks)

    def set_task_state(self, task: str, state: TaskState | None) -> None:
        """Mirror a committed change (None removes the task)."""
        with self._lock:
            if state is None:
                self._tasks.pop(task, None)
            else:
                self._tasks[task] = state

    def load_tasks(self, states: Mapping[str, TaskState]) -> None:
        """Replace every task state (start-up)."""
        with self._lock:
            self._tasks = dict(states)

    def counts(self) -> dict[str, int]:
        """Number of tasks per state value."""
        with self._lock:
            counts: dict[str, int] = {}
            for state in self._tasks.values():
                counts[state.value] = counts.get(state.value, 0) + 1
            return counts
