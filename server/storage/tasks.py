"""Task repository."""

from __future__ import annotations

import builtins
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.storage.column_types import utc_now
from server.storage.enums import TaskState
from server.storage.models import Task


class TaskRepository:
    """Reads and writes :class:`Task` rows inside the caller's transaction (never commits).

    Args:
        session: The session whose transaction the caller owns.
        clock: Source of ``created_at`` / ``updated_at``.
    """

    def __init__(self, session: Session, clock: Callable[[], datetime] = utc_now) -> None:
        self.session = session
        self.clock = clock

    def get(self, name: str) -> Task | None:
        """Returns the task called ``name``, or ``None``."""
        return self.session.get(Task, name)

    def get_for_update(self, name: str) -> Task | None:
        """Returns the task called ``name`` with its row locked until the transaction ends.

        PostgreSQL: ``SELECT ... FOR UPDATE``. SQLite: every transaction already holds the write
        lock (``BEGIN IMMEDIATE``). The object is refreshed from the database.
        """
        statement = select(Task).where(Task.name == name).with_for_update().execution_options(populate_existing=True)
        return self.session.scalars(statement).one_or_none()

    def list(self, state: TaskState | None = None) -> builtins.list[Task]:
        """Returns tasks, oldest first, optionally only those in ``state``."""
        statement = select(Task).order_by(Task.created_at, Task.name)
        if state is not None:
            statement = statement.where(Task.state == state)
        return builtins.list(self.session.scalars(statement))

    def count(self, state: TaskState | None = None) -> int:
        """Returns the number of tasks, optionally only those in ``state``."""
        statement = select(func.count()).select_from(Task)
        if state is not None:
            statement = statement.where(Task.state == state)
        return int(self.session.scalar(statement) or 0)

    def count_temporary(self) -> int:
        """Returns the number of tasks held (or to be held) by side networks, not yet committed or unlearned."""
        statement = select(func.count()).select_from(Task).where(Task.temporary.is_(True))
        return int(self.session.scalar(statement) or 0)

    def expired_temporary(self, now: datetime) -> builtins.list[Task]:
        """Returns TEMPORARY tasks whose ``expires_at`` is at or before ``now``, soonest first."""
        statement = (
            select(Task)
            .where(Task.state == TaskState.TEMPORARY, Task.expires_at.is_not(None), Task.expires_at <= now)
            .order_by(Task.expires_at, Task.name)
        )
        return builtins.list(self.session.scalars(statement))

    def counts_by_state(self) -> dict[TaskState, int]:
        """Returns the number of tasks in every state (zero included), e.g. for the ``lethe_tasks`` gauge."""
        counts = dict.fromkeys(TaskState, 0)
        for state, count in self.session.execute(select(Task.state, func.count()).group_by(Task.state)):
            counts[TaskState(state)] = int(count)
        return counts

    def add(self, task: Task) -> Task:
        """Inserts a new task (flushed, so a duplicate name raises ``IntegrityError`` here).

        ``created_at`` and ``updated_at`` default to the clock.
        """
        now = self.clock()
        if task.created_at is None:
            task.created_at = now
        if task.updated_at is None:
            task.updated_at = now
        self.session.add(task)
        self.session.flush()
        return task

    def save(self, task: Task) -> Task:
        """Writes changes to ``task`` (flushed) and stamps ``updated_at``."""
        task.updated_at = self.clock()
        self.session.add(task)
        self.session.flush()
        return task
