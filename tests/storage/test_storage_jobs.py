"""Job repository: queue order, paging, idempotency."""

from __future__ import annotations

import re

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from server.storage import Job, JobKind, JobRepository, JobState


def _queue(session: Session, kind: JobKind, task: str, state: JobState = JobState.QUEUED) -> Job:
    return JobRepository(session).add(Job(kind=kind, task=task, state=state, principal="tester"))


def test_add_assigns_a_uuid_id_and_increasing_seq(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        first = _queue(session, JobKind.LEARN, "a")
        second = _queue(session, JobKind.LEARN, "b")
    assert re.fullmatch(r"[0-9a-f]{32}", first.id)
    assert first.id != second.id
    assert second.seq > first.seq
    with session_factory() as session:
        stored = JobRepository(session).get(first.id)
        assert stored is not None
        assert (stored.kind, stored.state, stored.method, stored.progress, stored.attempts) == (
            JobKind.LEARN,
            JobState.QUEUED,
            "",
            0.0,
            0,
        )
        assert stored.options == {} and stored.metrics == {}
        assert JobRepository(session).get("0" * 32) is None


def test_next_runnable_takes_unlearn_jobs_first_then_fifo(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        learn_a = _queue(session, JobKind.LEARN, "a")
        _queue(session, JobKind.UNLEARN, "old", state=JobState.CANCELLED)
        learn_b = _queue(session, JobKind.LEARN, "b")
        unlearn_x = _queue(session, JobKind.UNLEARN, "x")
        commit_c = _queue(session, JobKind.COMMIT, "c")
        unlearn_y = _queue(session, JobKind.UNLEARN, "y")
        _queue(session, JobKind.LEARN, "done", state=JobState.SUCCEEDED)

    expected = [unlearn_x.id, unlearn_y.id, learn_a.id, learn_b.id, commit_c.id]
    taken: list[str] = []
    while True:
        with session_factory.begin() as session:
            jobs = JobRepository(session)
            job = jobs.next_runnable()
            if job is None:
                break
            taken.append(job.id)
            job.state = JobState.RUNNING
            assert [running.id for running in jobs.running()] == [job.id]
            job.state = JobState.SUCCEEDED
    assert taken == expected


def test_next_runnable_skips_running_failed_and_cancelled_jobs(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        for state in (JobState.RUNNING, JobState.FAILED, JobState.CANCELLED, JobState.SUCCEEDED):
            _queue(session, JobKind.UNLEARN, f"u-{state}", state=state)
        assert JobRepository(session).next_runnable() is None
        learn = _queue(session, JobKind.LEARN, "a")
        assert JobRepository(session).next_runnable() is learn


def test_count_queued_and_running(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        jobs = JobRepository(session)
        assert jobs.count_queued() == 0
        _queue(session, JobKind.LEARN, "a")
        _queue(session, JobKind.UNLEARN, "b")
        _queue(session, JobKind.LEARN, "c", state=JobState.RUNNING)
        _queue(session, JobKind.LEARN, "d", state=JobState.CANCELLED)
        assert jobs.count_queued() == 2
        assert jobs.count_queued(JobKind.UNLEARN) == 1
        assert [job.task for job in jobs.running()] == ["c"]


def test_list_filters_and_pages_by_seq(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        for index in range(7):
            _queue(session, JobKind.LEARN if index % 2 else JobKind.UNLEARN, f"t{index % 3}")
    with session_factory() as session:
        jobs = JobRepository(session)
        pages: list[list[str]] = []
        cursor = 0
        while page := jobs.list(after_seq=cursor, limit=3):
            pages.append([job.task for job in page])
            cursor = page[-1].seq
        assert pages == [["t0", "t1", "t2"], ["t0", "t1", "t2"], ["t0"]]
        assert [job.task for job in jobs.list(task="t1")] == ["t1", "t1"]
        assert len(jobs.list(state=JobState.QUEUED, kind=JobKind.LEARN)) == 3
        assert jobs.list(state=JobState.RUNNING) == []
        with pytest.raises(ValueError, match="limit"):
            jobs.list(limit=0)


def test_idempotency_key_is_unique_in_the_database(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        JobRepository(session).add(Job(kind=JobKind.LEARN, task="a", idempotency_key="key-1"))
        # Jobs without a key never collide (NULLs are distinct).
        JobRepository(session).add(Job(kind=JobKind.LEARN, task="b"))
        JobRepository(session).add(Job(kind=JobKind.LEARN, task="c"))
    with pytest.raises(IntegrityError), session_factory.begin() as session:
        JobRepository(session).add(Job(kind=JobKind.LEARN, task="a", idempotency_key="key-1"))
    with session_factory() as session:
        found = JobRepository(session).by_idempotency_key("key-1")
        assert found is not None and found.task == "a"
        assert JobRepository(session).by_idempotency_key("key-2") is None
