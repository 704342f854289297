"""The readiness gate of the job service: no write before start-up recovery is done.

Before :meth:`JobService.mark_ready` a new spool could be swept as an orphan by the recovery, or a
state accepted here undone by its state reload; so every write waits ``ready_wait_seconds`` for
it and then answers UNAVAILABLE, having written nothing.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from server.engine.protocol import LearnOptions
from server.errors import UnavailableError
from server.jobs import (
    JobEvents,
    JobService,
    LearnStream,
    LearnSubmission,
    QueueLimits,
    ServingState,
    UnlearnSubmission,
)
from server.storage import AuditEvent, DataFile, Job, JobState, Task, TaskState
from tests.support import digits

OPTIONS = LearnOptions(epochs=1, batch_size=32, learning_rate=1e-3, holdout_fraction=0.2)


def _service(sessions: sessionmaker[Session], data_dir: Path, wait: float) -> JobService:
    limits = QueueLimits(max_queued_jobs=10, max_tasks=10, ready_wait_seconds=wait)
    return JobService(sessions, data_dir, JobEvents(), ServingState(), limits)


def _learn(jobs: JobService, task: str) -> Job:
    x, y = digits([0, 1])
    with LearnStream(jobs, LearnSubmission(task=task, idempotency_key="", options=OPTIONS)) as stream:
        stream.append(x, y, [])
        return stream.submit("tester", ended_early=lambda: False)


def _rows(sessions: sessionmaker[Session]) -> dict[str, int]:
    with sessions() as session:
        return {
            model.__name__: int(session.scalar(select(func.count()).select_from(model)) or 0)
            for model in (Job, Task, DataFile, AuditEvent)
        }


def _files(data_dir: Path) -> list[Path]:
    keys = data_dir / "keys"  # the server's sample-id key is not data
    return sorted(p for p in data_dir.rglob("*") if p.is_file() and keys not in p.parents)


def test_writes_wait_for_recovery_and_then_refuse_writing_nothing(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    jobs = _service(session_factory, data_dir, wait=0.2)
    submission = LearnSubmission(task="a", idempotency_key="", options=OPTIONS)
    attempts = {
        "check_learn": lambda: jobs.check_learn(submission),
        "learn stream": lambda: _learn(jobs, "a"),
        "submit_unlearn": lambda: jobs.submit_unlearn(UnlearnSubmission("a", "", "", ""), "tester"),
        "cancel": lambda: jobs.cancel("0" * 32, "tester"),
    }
    for what, attempt in attempts.items():
        started = time.monotonic()
        with pytest.raises(UnavailableError, match="recovering"):
            attempt()
        assert time.monotonic() - started >= 0.2, f"{what} did not wait for recovery"
    assert _rows(session_factory) == {"Job": 0, "Task": 0, "DataFile": 0, "AuditEvent": 0}
    assert _files(data_dir) == []  # the spool of the refused stream was deleted
    assert jobs.serving.task_state("a") is None

    jobs.mark_ready()
    jobs.check_learn(submission)
    cancelled = jobs.cancel(_learn(jobs, "a").id, "tester")
    assert cancelled.state == JobState.CANCELLED
    queued = _learn(jobs, "b")
    unlearned = jobs.submit_unlearn(UnlearnSubmission("b", "", "", ""), "tester")
    assert unlearned.state == JobState.SUCCEEDED  # its data never reached the model
    assert jobs.get_job(queued.id).state == JobState.CANCELLED
    assert jobs.get_task("b").state == TaskState.UNLEARNED
    assert _files(data_dir / "spool") == []


def test_a_write_waiting_at_the_gate_goes_through_once_recovery_is_done(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    jobs = _service(session_factory, tmp_path / "data", wait=30.0)
    outcome: list[object] = []

    def submit() -> None:
        try:
            outcome.append(_learn(jobs, "a"))
        except Exception as error:  # reported below
            outcome.append(error)

    writer = threading.Thread(target=submit)
    writer.start()
    time.sleep(0.3)
    assert outcome == [] and _rows(session_factory)["Job"] == 0  # waiting, nothing written yet
    jobs.mark_ready()
    writer.join(10)
    assert not writer.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], Job), outcome
    assert jobs.get_job(outcome[0].id).state == JobState.QUEUED
