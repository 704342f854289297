"""Metrics follow the order jobs were applied to the model, not the order they were submitted.

Unlearns run before earlier-queued learns, and an unlearn of a task whose data never reached the
model succeeds at once without touching the model; so "the job before this one" (a_{u-1} of spill,
the CER chain) is the last job *applied* with an evaluation, never simply the highest ``seq``.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from client import LetheClient, pb
from server.app import App
from server.jobs import Lifecycle
from server.storage import EvaluationRepository, Job, JobKind, JobState, utc_now
from tests.fakes import SlowStrategy, factory
from tests.support import digits, make_config, running_app

T0 = utc_now() - timedelta(hours=1)


def _applied(
    session: Session,
    kind: JobKind,
    task: str,
    version: int,
    finished: datetime,
    accuracies: dict[str, float],
) -> Job:
    """A SUCCEEDED job that produced model ``version`` at ``finished``, with its row of the matrix."""
    job = Job(id=uuid.uuid4().hex, kind=kind, task=task, principal="p", created_at=T0)
    Lifecycle().new_job(session, job, JobState.SUCCEEDED)
    job.model_version, job.finished_at = version, finished
    session.flush()
    EvaluationRepository(session).add_rows(job.seq, accuracies)
    return job


@pytest.mark.parametrize("overtaken", [JobKind.LEARN, JobKind.UNLEARN])
def test_latest_accuracies_are_those_of_the_job_applied_last(
    session_factory: sessionmaker[Session], overtaken: JobKind
) -> None:
    """The job submitted second (higher ``seq``) ran first; the one submitted first was applied last."""
    with session_factory() as session, session.begin():
        _applied(session, JobKind.LEARN, "a", 1, T0 + timedelta(minutes=1), {"a": 90.0})
        last = _applied(session, overtaken, "b", 3, T0 + timedelta(minutes=3), {"a": 80.0, "b": 70.0})
        _applied(session, JobKind.UNLEARN, "a", 2, T0 + timedelta(minutes=2), {"a": 10.0})
    with session_factory() as session:
        evaluations = EvaluationRepository(session)
        newest = evaluations.last_evaluated_job()
        assert newest is not None and newest.id == last.id
        assert evaluations.latest_accuracies() == {"a": 80.0, "b": 70.0}


def test_a_job_that_left_the_model_as_it_was_is_ordered_by_when_it_finished(
    session_factory: sessionmaker[Session],
) -> None:
    """An unlearn whose data never reached the model keeps the model version; it was applied after the job
    that produced that version, even with a lower ``seq``."""
    with session_factory() as session, session.begin():
        same_version = _applied(session, JobKind.UNLEARN, "q", 1, T0 + timedelta(minutes=2), {"a": 91.0})
        _applied(session, JobKind.LEARN, "a", 1, T0 + timedelta(minutes=1), {"a": 90.0})
        # An unlearn that succeeded at once has no row of the matrix: it is not "the job before".
        instant = Job(id=uuid.uuid4().hex, kind=JobKind.UNLEARN, task="r", principal="p", created_at=T0)
        Lifecycle().new_job(session, instant, JobState.SUCCEEDED)
        instant.model_version, instant.finished_at = 1, T0 + timedelta(minutes=5)
    with session_factory() as session:
        evaluations = EvaluationRepository(session)
        newest = evaluations.last_evaluated_job()
        assert newest is not None and newest.id == same_version.id
        assert evaluations.latest_accuracies() == {"a": 91.0}


def _wait_running(client: LetheClient, job_id: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.job(job_id)
        if job.state == pb.RUNNING and job.progress > 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not start running")


def test_cer_keeps_counting_after_an_instant_unlearn(tmp_path: Path, database_url: str) -> None:
    """lure (class-incremental): an unlearn that succeeds at once while a learn runs does not restart
    the cumulative error count of the next job applied."""
    release = threading.Event()
    config = make_config(tmp_path / "data", database_url, **{"model.strategy": "lure", "training.epochs": 1})
    slow = factory(App(config).build_strategy, lambda s: SlowStrategy(s, release))
    with running_app(config, strategy_factory=slow) as server:
        c = server.client
        release.set()
        # Barely trained (a tiny learning rate): most of its probe set is misclassified, so CER starts > 0.
        first = c.wait(c.learn("a", *digits([0, 1, 2, 3]), learning_rate=1e-6).id)
        assert first.metrics["cer"] > 10
        release.clear()
        running = c.learn("c", *digits([4, 5]))
        _wait_running(c, running.id)
        queued = c.learn("b", *digits([6, 7]))
        instant = c.unlearn("b")
        assert instant.state == pb.SUCCEEDED and c.job(queued.id).state == pb.CANCELLED
        release.set()
        done = c.wait(running.id)
        row = next(r for r in c.evaluations() if r.job_id == running.id)
        probes = {"a": first.metrics["probe_samples"], "c": done.metrics["probe_samples"]}
        assert set(row.accuracies) == set(probes)
        errors = sum((1 - row.accuracies[t] / 100) * n for t, n in probes.items())
        assert done.metrics["cer"] == pytest.approx(first.metrics["cer"] + errors, abs=1e-3)
