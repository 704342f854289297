"""Evaluation repository: the accuracy matrix."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from server.storage import EvaluationRepository, EvaluationRow, Job, JobKind, JobRepository, JobState

FINISHED = datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)


def _finished_job(session: Session, kind: JobKind, task: str, state: JobState, version: int) -> Job:
    job = Job(kind=kind, task=task, state=state, model_version=version, finished_at=FINISHED)
    job.metrics = {"spill": 1.5} if kind is JobKind.UNLEARN else {}
    return JobRepository(session).add(job)


def test_matrix_has_one_row_per_successful_job_oldest_first(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        evaluations = EvaluationRepository(session)
        learn_a = _finished_job(session, JobKind.LEARN, "a", JobState.SUCCEEDED, 1)
        evaluations.add_rows(learn_a.seq, {"a": 95.0})
        failed = _finished_job(session, JobKind.LEARN, "b", JobState.FAILED, 1)
        learn_b = _finished_job(session, JobKind.LEARN, "b", JobState.SUCCEEDED, 2)
        evaluations.add_rows(learn_b.seq, {"a": 93.0, "b": 90.0})
        _finished_job(session, JobKind.LEARN, "z", JobState.QUEUED, 0)
        unlearn_a = _finished_job(session, JobKind.UNLEARN, "a", JobState.SUCCEEDED, 3)
        evaluations.add_rows(unlearn_a.seq, {"a": 11.0, "b": 89.5})
        commit = _finished_job(session, JobKind.COMMIT, "b", JobState.SUCCEEDED, 4)  # no probe sets left
        seqs = (learn_a.seq, failed.seq, learn_b.seq, unlearn_a.seq, commit.seq)

    with session_factory() as session:
        matrix = EvaluationRepository(session).matrix()
    assert [row.job_seq for row in matrix] == [seqs[0], seqs[2], seqs[3], seqs[4]]
    assert matrix[2] == EvaluationRow(
        job_seq=unlearn_a.seq,
        job_id=unlearn_a.id,
        kind=JobKind.UNLEARN,
        task="a",
        model_version=3,
        accuracies={"a": 11.0, "b": 89.5},
        metrics={"spill": 1.5},
        finished_at=FINISHED,
    )
    assert matrix[0].accuracies == {"a": 95.0}
    assert matrix[3].accuracies == {} and matrix[3].kind is JobKind.COMMIT


def test_matrix_pages_by_job_seq(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        evaluations = EvaluationRepository(session)
        for version in range(1, 8):
            job = _finished_job(session, JobKind.LEARN, f"t{version}", JobState.SUCCEEDED, version)
            evaluations.add_rows(job.seq, {f"t{done}": 90.0 + done for done in range(1, version + 1)})
    pages: list[list[int]] = []
    cursor = 0
    with session_factory() as session:
        evaluations = EvaluationRepository(session)
        while page := evaluations.matrix(after_job_seq=cursor, limit=3):
            pages.append([row.model_version for row in page])
            assert all(len(row.accuracies) == row.model_version for row in page)
            cursor = page[-1].job_seq
        assert evaluations.for_job(cursor) == {f"t{done}": 90.0 + done for done in range(1, 8)}
        with pytest.raises(ValueError, match="limit"):
            evaluations.matrix(limit=0)
    assert pages == [[1, 2, 3], [4, 5, 6], [7]]


def test_one_row_per_job_and_task(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        job = _finished_job(session, JobKind.LEARN, "a", JobState.SUCCEEDED, 1)
        EvaluationRepository(session).add_rows(job.seq, {"a": 50.0})
    with pytest.raises(IntegrityError), session_factory.begin() as session:
        EvaluationRepository(session).add_rows(job.seq, {"a": 51.0})


def test_rows_must_reference_an_existing_job(session_factory: sessionmaker[Session]) -> None:
    with pytest.raises(IntegrityError), session_factory.begin() as session:
        EvaluationRepository(session).add_rows(12345, {"a": 50.0})


def test_latest_accuracies_are_those_of_the_newest_evaluated_successful_job(
    session_factory: sessionmaker[Session],
) -> None:
    with session_factory.begin() as session:
        evaluations = EvaluationRepository(session)
        assert evaluations.latest_accuracies() == {}
        first = _finished_job(session, JobKind.LEARN, "a", JobState.SUCCEEDED, 1)
        evaluations.add_rows(first.seq, {"a": 90.0})
        second = _finished_job(session, JobKind.LEARN, "b", JobState.SUCCEEDED, 2)
        evaluations.add_rows(second.seq, {"a": 88.0, "b": 91.0})
        _finished_job(session, JobKind.COMMIT, "b", JobState.SUCCEEDED, 3)  # not evaluated
        assert evaluations.latest_accuracies() == {"a": 88.0, "b": 91.0}
