"""Task repository."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from server.storage import Task, TaskRepository, TaskState


class SteppingClock:
    """A clock that advances one second per reading."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def test_add_get_and_save(session_factory: sessionmaker[Session]) -> None:
    clock = SteppingClock()
    with session_factory.begin() as session:
        task = TaskRepository(session, clock).add(Task(name="digits-0", state=TaskState.LEARNING, samples=100))
        task.classes = [3, 1, 1, 2]
    assert task.created_at == task.updated_at == datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)
    with session_factory.begin() as session:
        tasks = TaskRepository(session, clock)
        stored = tasks.get_for_update("digits-0")
        assert stored is not None
        assert stored.classes == [1, 2, 3]
        assert (stored.ops_since_unlearn, stored.accuracy, stored.learned_version) == (0, None, None)
        stored.state = TaskState.LEARNED
        stored.accuracy = 97.5
        stored.learned_version = 3
        tasks.save(stored)
    with session_factory() as session:
        reread = TaskRepository(session).get("digits-0")
        assert reread is not None
        assert (reread.state, reread.accuracy, reread.learned_version) == (TaskState.LEARNED, 97.5, 3)
        assert reread.updated_at == datetime(2026, 1, 1, 0, 0, 2, tzinfo=UTC)
        assert reread.created_at == datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC)
        assert TaskRepository(session).get("missing") is None
        assert TaskRepository(session).get_for_update("missing") is None


def test_duplicate_names_are_refused(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        TaskRepository(session).add(Task(name="a", state=TaskState.LEARNING))
    with pytest.raises(IntegrityError), session_factory.begin() as session:
        TaskRepository(session).add(Task(name="a", state=TaskState.LEARNING))


def test_list_and_count_by_state(session_factory: sessionmaker[Session]) -> None:
    clock = SteppingClock()
    with session_factory.begin() as session:
        tasks = TaskRepository(session, clock)
        for name, state in [("c", TaskState.LEARNED), ("a", TaskState.UNLEARNED), ("b", TaskState.LEARNED)]:
            tasks.add(Task(name=name, state=state))
    with session_factory() as session:
        tasks = TaskRepository(session)
        assert [task.name for task in tasks.list()] == ["c", "a", "b"]  # oldest first
        assert [task.name for task in tasks.list(TaskState.LEARNED)] == ["c", "b"]
        assert tasks.count() == 3
        assert tasks.count(TaskState.UNLEARNED) == 1
        counts = tasks.counts_by_state()
        assert counts[TaskState.LEARNED] == 2
        assert counts[TaskState.UNLEARNED] == 1
        assert counts[TaskState.TEMPORARY] == 0
        assert set(counts) == set(TaskState)
