"""The LEARN and UNLEARN handlers as units: a real job context, each phase driven and inspected.

See :mod:`tests.jobs.harness`: a real (small) strategy, a migrated SQLite or PostgreSQL database, a
temporary data directory; no worker thread, so a test can look between compute and commit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from server.data import sha256_file
from server.jobs.finish import evaluate_model
from server.jobs.kinds import FORGET_SAMPLES, HANDLERS, UnlearnHandler, handler_for
from server.storage import (
    AuditEvent,
    AuditLog,
    DataFile,
    DataFileKind,
    EvaluationRepository,
    Job,
    JobKind,
    JobRepository,
    JobState,
    Task,
    TaskRepository,
    TaskState,
)
from tests.crash_harness import unaccounted_files
from tests.jobs.harness import Harness, make_harness


def _files(h: Harness, task: str) -> dict[DataFileKind, DataFile]:
    """The task's data-file rows, live or purged, by kind (one per kind in these tests)."""
    with h.session() as session:
        rows = session.query(DataFile).filter(DataFile.task == task).all()
    assert len({r.kind for r in rows}) == len(rows), rows
    return {r.kind: r for r in rows}


def _job(h: Harness, job_id: str) -> Job:
    with h.session() as session:
        job = JobRepository(session).get(job_id)
    assert job is not None
    return job


def _task(h: Harness, name: str) -> Task:
    with h.session() as session:
        task = TaskRepository(session).get(name)
    assert task is not None
    return task


def _events(h: Harness, task: str) -> list[AuditEvent]:
    with h.session() as session:
        return AuditLog().list(session, limit=1000, task=task)


def test_learn_records_its_files_before_writing_them_and_completes_them_at_commit(
    session_factory: sessionmaker[Session], migrated_url: str, tmp_path: Path
) -> None:
    h = make_harness(session_factory, tmp_path)
    layout = h.ctx.layout
    job = h.claim(h.submit_learn("a", [0, 1]).id)
    assert job.attempts == 1

    run = h.compute(job)

    # Compute: one intent row per file, written before the file, nothing committed about the job yet.
    files = _files(h, "a")
    assert set(files) == {DataFileKind.SPOOL, DataFileKind.PROBE, DataFileKind.MEMBER}  # finetune keeps no replay
    for kind in (DataFileKind.PROBE, DataFileKind.MEMBER):
        row = files[kind]
        assert (row.path, row.job_id, row.bytes, row.sha256, row.purged_at) == (
            layout.job_file(kind, job.id, 1),
            job.id,
            0,
            "",
            None,
        )
        assert layout.absolute(row.path).is_file()
    spool = files[DataFileKind.SPOOL]
    assert spool.path == layout.spool(job.id) and layout.absolute(spool.path).is_file()
    assert run.changed_model and run.metrics["probe_samples"] > 0 and run.metrics["samples"] > 0
    assert _task(h, "a").state == TaskState.LEARNING and _job(h, job.id).state == JobState.RUNNING

    h.finish(run)

    files = _files(h, "a")
    kept = [files[DataFileKind.PROBE], files[DataFileKind.MEMBER]]
    for row in kept:
        on_disk = layout.absolute(row.path)
        assert row.purged_at is None
        assert (row.bytes, row.sha256) == (on_disk.stat().st_size, sha256_file(on_disk))
        assert row.bytes > 0
    spool = files[DataFileKind.SPOOL]
    assert spool.purged_at is not None and not layout.absolute(spool.path).exists()  # consumed by the model
    task, done = _task(h, "a"), _job(h, job.id)
    assert task.state == TaskState.LEARNED and task.learned_version == 1 == h.ctx.strategy.version
    assert done.state == JobState.SUCCEEDED and done.model_version == 1 and done.progress == 1.0
    assert h.ctx.serving.task_state("a") == TaskState.LEARNED
    with h.session() as session:
        matrix = EvaluationRepository(session).matrix()
    assert [(r.job_id, set(r.accuracies)) for r in matrix] == [(job.id, {"a"})]
    assert task.accuracy == matrix[0].accuracies["a"]
    succeeded = [e for e in _events(h, "a") if e.action == "learn.succeeded"]
    assert len(succeeded) == 1 and succeeded[0].job_id == job.id
    listed = {f["path"]: (f["kind"], f["bytes"], f["sha256"]) for f in succeeded[0].details["files"]}
    assert listed == {r.path: (r.kind.value, r.bytes, r.sha256) for r in kept}
    assert unaccounted_files(h.data_dir, migrated_url) == {}


def test_unlearn_of_a_task_whose_learn_is_still_queued_cancels_it_and_leaves_the_model(
    session_factory: sessionmaker[Session], migrated_url: str, tmp_path: Path
) -> None:
    """The learn was running when the unlearn arrived, then a restart re-queued it behind the unlearn."""
    h = make_harness(session_factory, tmp_path)
    learn = h.claim(h.submit_learn("q", [0, 1]).id)
    unlearn = h.submit_unlearn("q")
    assert unlearn.state == JobState.QUEUED  # its learn is RUNNING: not the instant path
    with h.ctx.transaction() as session:
        row = JobRepository(session).get_for_update(learn.id)
        assert row is not None
        h.ctx.lifecycle.requeue(session, row, "interrupted by a restart")
    spool = _files(h, "q")[DataFileKind.SPOOL]

    claimed = h.claim()  # what the worker runs next: the unlearn overtakes the re-queued learn
    assert claimed.id == unlearn.id
    run = h.compute(claimed)
    assert not run.changed_model and run.metrics == {}
    h.finish(run)

    assert _job(h, learn.id).state == JobState.CANCELLED
    done = _job(h, unlearn.id)
    assert done.state == JobState.SUCCEEDED and done.model_version == 0
    task = _task(h, "q")
    assert task.state == TaskState.UNLEARNED
    assert (task.learned_version, task.unlearned_version, task.relapse) == (None, None, None)
    assert h.ctx.strategy.version == 0 and h.ctx.checkpoints.paths() == []  # the model never saw it
    assert _files(h, "q")[DataFileKind.SPOOL].purged_at is not None
    assert not h.ctx.layout.absolute(spool.path).exists()
    actions = [(e.action, e.job_id) for e in _events(h, "q")]
    assert ("job.cancelled", learn.id) in actions and ("unlearn.succeeded", unlearn.id) in actions
    purged = [e for e in _events(h, "q") if e.action == "data.purged"]
    assert [f["path"] for e in purged for f in e.details["files"]] == [spool.path]
    assert h.ctx.serving.task_state("q") == TaskState.UNLEARNED
    assert unaccounted_files(h.data_dir, migrated_url) == {}


def test_a_learn_that_ends_after_its_unlearn_was_accepted_leaves_the_task_unlearning(
    session_factory: sessionmaker[Session], migrated_url: str, tmp_path: Path
) -> None:
    """The data reached the model, so the queued unlearn must really forget it (it is not skipped)."""
    h = make_harness(session_factory, tmp_path)
    learn = h.claim(h.submit_learn("a", [0, 1]).id)
    unlearn = h.submit_unlearn("a")  # accepted while the learn runs
    assert unlearn.state == JobState.QUEUED
    h.finish(h.compute(learn))
    task = _task(h, "a")
    assert task.state == TaskState.UNLEARNING and task.learned_version == 1
    assert h.ctx.serving.task_state("a") == TaskState.UNLEARNING
    run = h.run(unlearn.id)
    assert run.changed_model
    task = _task(h, "a")
    assert task.state == TaskState.UNLEARNED and task.unlearned_version == 2 == h.ctx.strategy.version
    assert _files(h, "a")[DataFileKind.MEMBER].purged_at is not None
    assert unaccounted_files(h.data_dir, migrated_url) == {}


@pytest.mark.parametrize(
    "strategy,forget_probe_ops",
    [("finetune", 3), ("lure", 0)],  # task-incremental, probe kept; class-incremental with replay, all purged
)
def test_unlearn_of_a_learned_task_measures_it_and_purges_its_data(
    session_factory: sessionmaker[Session], migrated_url: str, tmp_path: Path, strategy: str, forget_probe_ops: int
) -> None:
    h = make_harness(session_factory, tmp_path, strategy=strategy, forget_probe_ops=forget_probe_ops)
    h.learn("a", [0, 1])
    h.learn("b", [2, 3])
    before = _files(h, "a")
    expected_kinds = {DataFileKind.SPOOL, DataFileKind.PROBE, DataFileKind.MEMBER}
    if h.ctx.strategy.needs_replay:
        expected_kinds.add(DataFileKind.RETAINED)
    assert set(before) == expected_kinds
    others = {r.path for r in _files(h, "b").values() if r.purged_at is None}
    version = h.ctx.strategy.version
    job = h.claim(h.submit_unlearn("a").id)

    run = h.compute(job)
    assert run.changed_model and "unlearn_seconds" in run.metrics and run.metrics["forget_attempts"] == 1.0
    assert h.ctx.strategy.version == version + 1
    measured = UnlearnHandler().measure(h.ctx, run, evaluate_model(h.ctx))
    assert {"mia", "uni", "forget_verified", "forget_reference", "forget_excess"} <= set(measured)
    assert 0.0 <= measured["mia"] <= 100.0
    h.finish(run)

    files = _files(h, "a")
    doomed = [k for k in (DataFileKind.MEMBER, DataFileKind.RETAINED, DataFileKind.PROBE) if k in files]
    if forget_probe_ops > 0:
        doomed.remove(DataFileKind.PROBE)  # kept to measure relapse for forget_probe_ops more operations
        probe = files[DataFileKind.PROBE]
        assert probe.purged_at is None and h.ctx.layout.absolute(probe.path).is_file()
    for kind in doomed:
        assert files[kind].purged_at is not None, kind
        assert not h.ctx.layout.absolute(files[kind].path).exists(), kind
    assert {r.path for r in _files(h, "b").values() if r.purged_at is None} == others  # b keeps everything
    task, done = _task(h, "a"), _job(h, job.id)
    assert task.state == TaskState.UNLEARNED and task.unlearned_version == h.ctx.strategy.version == version + 1
    assert task.relapse == (0.0 if forget_probe_ops > 0 else None)
    assert done.state == JobState.SUCCEEDED and done.model_version == version + 1
    assert {"spill", "mia", "forget_verified", "forget_accuracy_task"} <= set(done.metrics)
    assert done.metrics["purged_bytes"] == sum(before[k].bytes for k in doomed) > 0  # the rows' real sizes
    purged = [e for e in _events(h, "a") if e.action == "data.purged" and e.details["why"] == "unlearned"]
    assert len(purged) == 1 and purged[0].job_id == job.id
    assert sorted(f["path"] for f in purged[0].details["files"]) == sorted(files[k].path for k in doomed)
    assert h.ctx.serving.task_state("a") == TaskState.UNLEARNED
    assert unaccounted_files(h.data_dir, migrated_url) == {}


def test_a_job_kind_without_a_handler_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(HANDLERS) == set(JobKind), "every job kind has a handler"
    monkeypatch.delitem(HANDLERS, JobKind.COMMIT)
    with pytest.raises(NotImplementedError, match="commit"):
        handler_for(Job(kind=JobKind.COMMIT, options_json="{}"))
    learn, unlearn = (Job(kind=kind, options_json="{}") for kind in (JobKind.LEARN, JobKind.UNLEARN))
    assert handler_for(learn).cancellable and not handler_for(unlearn).cancellable
    records = Job(kind=JobKind.UNLEARN, options_json='{"sample_ids": 3}')
    assert handler_for(records) is FORGET_SAMPLES and not FORGET_SAMPLES.cancellable
