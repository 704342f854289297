"""The lifecycle table: every allowed transition works, every other pair is refused, and no other
module assigns a job or task state or spells a data path."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from server.jobs.lifecycle import JOB_TRANSITIONS, TASK_TRANSITIONS, IllegalTransitionError, Lifecycle
from server.storage import DataFile, DataFileKind, DataFileRepository, Job, JobKind, JobState, Task, TaskState, utc_now

ROOT = Path(__file__).resolve().parents[2]


def _job(state: JobState | None, kind: JobKind = JobKind.LEARN) -> Job:
    job = Job(id=f"job-{kind.value}", kind=kind, task="t", principal="p", created_at=utc_now())
    job.state = state  # type: ignore[assignment]  # a test builds rows in every state
    return job


@pytest.mark.parametrize("old,new", list(itertools.product([None, *JobState], JobState)))
def test_job_transitions_follow_the_table(old: JobState | None, new: JobState) -> None:
    job = _job(old)
    session = Session()  # no database needed: the check happens before anything is written
    if (old, new) in JOB_TRANSITIONS:
        Lifecycle._job(session, job, new)
        assert job.state == new
        assert (job.finished_at is not None) == new.terminal
    else:
        with pytest.raises(IllegalTransitionError):
            Lifecycle._job(session, job, new)
        assert job.state == old


@pytest.mark.parametrize("old,new", list(itertools.product([None, *TaskState], [None, *TaskState])))
def test_task_transitions_follow_the_table(old: TaskState | None, new: TaskState | None) -> None:
    task = Task(name="t", samples=1)
    task.state = old  # type: ignore[assignment]
    session = Session()
    if (old, new) in TASK_TRANSITIONS and new is not None:
        Lifecycle._task(session, task, new)
        assert task.state == new
    elif (old, new) not in TASK_TRANSITIONS:
        with pytest.raises(IllegalTransitionError):
            Lifecycle._task(session, task, new)
        assert task.state == old


def test_terminal_outcomes_are_counted_only_when_committed(session_factory: sessionmaker[Session]) -> None:
    from server.jobs.lifecycle import on_outcome_commit

    counted: list[tuple[str, str]] = []
    on_outcome_commit(session_factory, lambda kind, outcome: counted.append((kind, outcome)))
    life = Lifecycle()
    with session_factory() as session, session.begin():
        life.new_task(session, "t", 10, [0, 1])
        job = Job(id="j1", kind=JobKind.LEARN, task="t", principal="p", created_at=utc_now())
        life.new_job(session, job)
        DataFileRepository(session).add(
            DataFile(kind=DataFileKind.SPOOL, task="t", job_id="j1", path="spool/j1.spool", bytes=3, sha256="x")
        )
    with pytest.raises(RuntimeError), session_factory() as session, session.begin():
        row = session.get(Job, job.seq)
        assert row is not None
        life.cancel(session, row, "p", "test")
        raise RuntimeError("rolled back")
    assert counted == []
    with session_factory() as session, session.begin():
        row = session.get(Job, job.seq)
        assert row is not None
        paths = life.cancel(session, row, "p", "test")
    assert counted == [("learn", "cancelled")]
    assert paths == ["spool/j1.spool"]  # a learn that never reached the model: its task and data go
    with session_factory() as session:
        assert session.get(Task, "t") is None
        assert DataFileRepository(session).live() == []


_STATE_ASSIGNMENT = re.compile(r"\.state\s*(=[^=]|,\s*[\w.]+\s*(,\s*[\w.]+\s*)*=[^=])")
_PATH_LITERAL = re.compile(r"""["']f?(spool|probes|members|retained|checkpoints)/""")


def _server_sources() -> list[Path]:
    return sorted((ROOT / "server").rglob("*.py"))


def test_only_the_lifecycle_assigns_job_or_task_states() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _server_sources()
        if path.name != "lifecycle.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _STATE_ASSIGNMENT.search(line) and "self.state" not in line
    ]
    assert offenders == []


def test_no_data_path_is_spelled_outside_the_layout() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _server_sources()
        if path.name != "layout.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _PATH_LITERAL.search(line) or re.search(r"""f["'](spool|probes|members|retained)/""", line)
    ]
    assert offenders == []


def test_worker_and_handlers_stay_small() -> None:
    modules = [ROOT / "server/jobs/worker.py", *sorted((ROOT / "server/jobs/kinds").glob("*.py"))]
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in modules}
    assert all(n < 300 for n in sizes.values()), sizes
