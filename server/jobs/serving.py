"""What Predict reads: the published model snapshot and the task states, both swapped atomically."""

from __future__ import annotations

import threading
from collections.abc import Mapping

from server.engine.protocol import Predictor
from server.storage.enums import TaskState


class ServingState:
    """The current serving snapshot and an in-memory copy of every task's state.

    Predict must never touch SQL or wait for training: the worker publishes a new immutable
    predictor after each job (one reference swap), and every committed task-state change is
    mirrored here right after its transaction.
    """

    def __init__(self) -> None:
        self._predictor: Predictor | None = None
        self._tasks: dict[str, TaskState] = {}
        self._lock = threading.Lock()

    @property
    def predictor(self) -> Predictor | None:
        """The published snapshot, or None before the model is loaded."""
        return self._predictor

    def publish(self, predictor: Predictor) -> None:
        """Swap in a new snapshot; in-flight predictions keep using the one they started with."""
        self._predictor = predictor

    def task_state(self, task: str) -> TaskState | None:
        """The task's state, or None for an unknown task."""
        with self._lock:
            return self._tasks.get(task)

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
