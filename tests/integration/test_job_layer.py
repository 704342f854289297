"""The job layer end to end: cancel of running jobs, failures in every phase, database outages.

Each test runs a real server (real SQL, real files) and, where a failure must be provoked, a
named fake from :mod:`tests.fakes` wrapping a real strategy. After every test the data directory
holds exactly the live ``data_files`` rows and the newest checkpoint.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.pool import NullPool

from client import LetheError, pb
from server.app import App
from server.config import Config
from tests.crash_harness import health_status, unaccounted_files, wait_for
from tests.fakes import FailingStrategy, SlowStrategy, UnprunableCheckpoints, UnrecordableFailures, factory
from tests.support import digits, make_config, running_app

#: The server's own model and training defaults (uncle, mlp, default width, its 20 epochs of 32).
DEFAULTS = {"model.strategy": "uncle", "model.width": 0, "training.epochs": 0, "training.batch_size": 0}


def _config(tmp_path: Path, database_url: str, **overrides: object) -> Config:
    return make_config(tmp_path / "data", database_url, **{**DEFAULTS, **overrides})


def _jobs_total(app: object, kind: str, outcome: str) -> float:
    value = app.registry.get_sample_value("lethe_jobs_total", {"kind": kind, "outcome": outcome})  # type: ignore[attr-defined]
    return float(value or 0.0)


def _wait_running(client: object, job_id: str, timeout: float = 120) -> pb.Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.job(job_id)  # type: ignore[attr-defined]
        if job.state == pb.RUNNING and job.progress > 0:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not start running")


def test_cancel_of_a_running_learn_restores_the_model_bit_for_bit(tmp_path: Path, database_url: str) -> None:
    """At the server's defaults on digits: cancelled within 5 s, same version, same predictions."""
    with running_app(_config(tmp_path, database_url)) as server:
        c = server.client
        x, y = digits([0, 1])
        c.wait(c.learn("kept", x, y, epochs=2).id)
        before = c.predict("kept", x[:64], probabilities=True)
        version = c.model().version
        xb, yb = digits([2, 3])
        job = c.learn("endless", xb, yb, epochs=10_000)  # would run for hours
        _wait_running(c, job.id)
        started = time.monotonic()
        cancelled = c.cancel(job.id)
        elapsed = time.monotonic() - started
        assert cancelled.state == pb.CANCELLED, cancelled
        assert elapsed <= 5.0, f"cancel took {elapsed:.1f} s"
        assert c.model().version == version
        after = c.predict("kept", x[:64], probabilities=True)
        assert after.outputs.tobytes() == before.outputs.tobytes()  # bit-identical
        with pytest.raises(LetheError) as gone:
            c.task("endless")
        assert gone.value.code == grpc.StatusCode.NOT_FOUND  # never reached the model: name free
        actions = [e.action for e in c.audit_events(task="endless")]
        assert actions.count("job.cancelled") == 1 and "data.purged" in actions
        assert _jobs_total(server.app, "learn", "cancelled") == 1
        assert unaccounted_files(tmp_path / "data", database_url) == {}
        assert c.wait(c.learn("endless", xb, yb, epochs=1).id).state == pb.SUCCEEDED


def test_cancel_of_a_running_unlearn_is_refused(tmp_path: Path, database_url: str) -> None:
    release, started = threading.Event(), threading.Event()
    config = make_config(tmp_path / "data", database_url)
    slow = factory(App(config).build_strategy, lambda s: SlowStrategy(s, release, started))
    with running_app(config, strategy_factory=slow) as server:
        c = server.client
        x, y = digits([0, 1])
        release.set()
        c.wait(c.learn("a", x, y).id)
        release.clear()
        unlearn = c.unlearn("a")
        _wait_running(c, unlearn.id)
        with pytest.raises(LetheError) as refused:
            c.cancel(unlearn.id)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "once started, finishes" in refused.value.message
        release.set()
        assert c.wait(unlearn.id).state == pb.SUCCEEDED
        assert c.task("a").state == pb.UNLEARNED


@pytest.mark.parametrize("fail_at", ["learn", "commit"])
def test_a_failed_learn_leaves_nothing_in_the_model_or_on_disk(tmp_path: Path, database_url: str, fail_at: str) -> None:
    """Whichever phase fails, the model is as before the job, and its name and data are gone."""
    config = make_config(tmp_path / "data", database_url)
    fired = threading.Event()
    build = App(config).build_strategy
    wrap = factory(build, lambda s: FailingStrategy(s, "broken", fail_at, fired))
    with running_app(config, strategy_factory=wrap) as server:
        c = server.client
        x, y = digits([0, 1])
        c.wait(c.learn("kept", x, y).id)
        before = c.predict("kept", x[:64], probabilities=True)
        version = c.model().version
        job = c.wait(c.learn("broken", *digits([2, 3])).id, check=False)
        assert job.state == pb.FAILED and "injected failure" in job.message
        assert fired.is_set()
        assert c.model().version == version
        assert c.predict("kept", x[:64], probabilities=True).outputs.tobytes() == before.outputs.tobytes()
        assert [t.name for t in c.tasks()] == ["kept"]
        assert _jobs_total(server.app, "learn", "failed") == 1
        assert unaccounted_files(tmp_path / "data", database_url) == {}
        # The name is free and the same data learns now; an exact unlearn later is unaffected.
        assert c.wait(c.learn("broken", *digits([2, 3])).id).state == pb.SUCCEEDED
        served = c.predict("kept", x[:64], probabilities=True).outputs.tobytes()
    with running_app(config) as restarted:  # the model restarts as served: the failed job is nowhere
        assert restarted.client.model().version == version + 1
        assert restarted.client.predict("kept", x[:64], probabilities=True).outputs.tobytes() == served
        assert unaccounted_files(tmp_path / "data", database_url) == {}


def test_instant_unlearn_and_queued_cancel_are_counted(tmp_path: Path, database_url: str) -> None:
    """lethe_jobs_total agrees with the audit trail for every outcome."""
    release = threading.Event()
    config = make_config(tmp_path / "data", database_url)
    build = App(config).build_strategy
    with running_app(config, strategy_factory=factory(build, lambda s: SlowStrategy(s, release))) as server:
        c = server.client
        x, y = digits([0, 1])
        blocking = c.learn("blocking", x, y)
        _wait_running(c, blocking.id)
        queued_a = c.learn("a", x, y)
        queued_b = c.learn("b", x, y)
        assert c.cancel(queued_a.id).state == pb.CANCELLED
        assert c.unlearn("b").state == pb.SUCCEEDED  # its data never reached the model
        assert c.job(queued_b.id).state == pb.CANCELLED
        release.set()
        c.wait(blocking.id)
        assert _jobs_total(server.app, "learn", "cancelled") == 2
        assert _jobs_total(server.app, "unlearn", "succeeded") == 1
        assert _jobs_total(server.app, "learn", "succeeded") == 1
        assert unaccounted_files(tmp_path / "data", database_url) == {}


@pytest.mark.postgres
def test_database_outage_during_a_running_learn_does_not_fail_it(tmp_path: Path, database_url: str) -> None:
    """PostgreSQL goes away while a learn trains and comes back: the learn SUCCEEDS, nothing is lost."""
    if not database_url.startswith("postgresql"):
        pytest.skip("the outage is simulated on a PostgreSQL database")
    url = make_url(database_url)
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool)
    release, started = threading.Event(), threading.Event()
    config = make_config(tmp_path / "data", database_url)
    build = App(config).build_strategy
    with running_app(config, strategy_factory=factory(build, lambda s: SlowStrategy(s, release, started))) as server:
        c = server.client
        x, y = digits([0, 1])
        job = c.learn("during", x, y)
        assert started.wait(60)
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS false'))
            conn.execute(
                text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{url.database}'")
            )
        try:
            time.sleep(3)  # progress flushes fail meanwhile
            release.set()  # training ends while the database is away: the commit must wait, not fail
            time.sleep(3)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS true'))
        deadline = time.monotonic() + 90
        while True:
            try:
                final = c.wait(job.id)
                break
            except LetheError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert final.state == pb.SUCCEEDED, final.message
        assert c.task("during").state == pb.LEARNED
        assert np.asarray(c.predict("during", x[:8]).classes).shape == (8,)
        assert server.app.worker is not None and server.app.worker.alive
        assert unaccounted_files(tmp_path / "data", database_url) == {}
    admin.dispose()


def test_worker_stops_loudly_when_the_end_of_a_job_cannot_be_recorded(tmp_path: Path, database_url: str) -> None:
    """Not running on with a job stuck RUNNING: the worker stops, readiness and lethe_worker_up drop,
    and the next start runs the job again, once."""
    config = make_config(tmp_path / "data", database_url)
    fired = threading.Event()
    wrap = factory(App(config).build_strategy, lambda s: FailingStrategy(s, "broken", "learn", fired))
    with running_app(config, strategy_factory=wrap) as server:
        c, worker = server.client, server.app.worker
        assert worker is not None
        c.wait(c.learn("kept", *digits([0, 1])).id)
        version = c.model().version
        worker.ctx.lifecycle = UnrecordableFailures()
        job = c.learn("broken", *digits([2, 3]))
        wait_for(lambda: not worker.alive, 60, "the worker to stop")
        assert c.job(job.id).state == pb.RUNNING
        assert health_status(server.target) == 2  # NOT_SERVING
        assert health_status(server.target, "") == 1  # alive: an operator can still read everything
        assert server.app.registry.get_sample_value("lethe_worker_up") == 0
        assert server.app.registry.get_sample_value("lethe_ready") == 0
    with running_app(config, strategy_factory=wrap) as restarted:
        done = restarted.client.wait(job.id)
        assert done.state == pb.SUCCEEDED and done.model_version == version + 1
        assert restarted.client.model().version == version + 1
        assert unaccounted_files(tmp_path / "data", database_url) == {}


def test_an_error_after_the_commit_never_turns_success_into_failure(tmp_path: Path, database_url: str) -> None:
    """Pruning old checkpoints fails after each commit: every job still SUCCEEDS, ends once, and the
    next start prunes what was left."""
    config = make_config(tmp_path / "data", database_url)
    with running_app(config) as server:
        c, worker = server.client, server.app.worker
        assert worker is not None
        worker.ctx.checkpoints = UnprunableCheckpoints(worker.ctx.blobs)
        first = c.wait(c.learn("a", *digits([0, 1])).id)
        second = c.wait(c.learn("b", *digits([2, 3])).id)
        assert (first.state, second.state) == (pb.SUCCEEDED, pb.SUCCEEDED)
        assert worker.alive
        endings = [e.action for e in c.audit_events() if e.job_id == second.id and "." in e.action]
        assert endings.count("learn.succeeded") == 1 and "learn.failed" not in endings
        assert _jobs_total(server.app, "learn", "succeeded") == 2 and _jobs_total(server.app, "learn", "failed") == 0
        assert len(list((tmp_path / "data" / "checkpoints").iterdir())) == 2
    with running_app(config):
        assert unaccounted_files(tmp_path / "data", database_url) == {}


def test_a_job_reads_as_ended_only_once_its_superseded_files_are_deleted(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting purged files after the commit is slowed down: an unlearn that reads SUCCEEDED (to
    GetJob, WatchJob and ListJobs) has no file of its task's data left (CI once read one in between)."""
    from server.data import FileBlobStore

    delete = FileBlobStore.delete

    def slow_delete(store: FileBlobStore, relative: str) -> object:
        time.sleep(0.5)
        return delete(store, relative)

    monkeypatch.setattr(FileBlobStore, "delete", slow_delete)
    data_dir = tmp_path / "data"
    with running_app(make_config(data_dir, database_url, **{"training.epochs": 1})) as server:
        c = server.client
        c.wait(c.learn("kept", *digits([0, 1])).id)
        learned = c.wait(c.learn("gone", *digits([2, 3])).id)
        job = c.wait(c.unlearn("gone").id)
        assert job.state == pb.SUCCEEDED
        assert [p for p in data_dir.rglob(f"{learned.id}*") if "probes" not in p.parts] == []
        assert unaccounted_files(data_dir, database_url, settle_seconds=0) == {}
        again = c.wait(c.learn("later", *digits([4, 5])).id)
        assert [j.state for j in c.jobs() if j.id == again.id] == [pb.SUCCEEDED]
        assert unaccounted_files(data_dir, database_url, settle_seconds=0) == {}


def _all_at_once(count: int, call: Callable[[], str]) -> list[str]:
    """Run ``call`` on ``count`` threads released together; return every answer (errors re-raised)."""
    barrier = threading.Barrier(count)
    answers: list[str] = []
    errors: list[BaseException] = []

    def send() -> None:
        try:
            barrier.wait()
            answers.append(call())
        except BaseException as error:  # reported in the test thread
            errors.append(error)

    threads = [threading.Thread(target=send) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    return answers


def test_concurrent_retries_with_one_idempotency_key_create_one_job(tmp_path: Path, database_url: str) -> None:
    """Eight clients send the same Learn with the same key at once: one job, one task, one spool; every
    answer names it (the race is decided by the database's unique key, not by a lookup)."""
    config = make_config(tmp_path / "data", database_url)
    x, y = digits([0, 1])
    with running_app(config) as server:
        c = server.client
        answers = _all_at_once(8, lambda: c.learn("same", x, y, idempotency_key="retry-key").id)
        assert len(answers) == 8 and len(set(answers)) == 1
        assert [j.id for j in c.jobs()] == answers[:1]
        assert c.wait(answers[0]).state == pb.SUCCEEDED
        assert [e.action for e in c.audit_events(task="same")].count("learn.requested") == 1
        assert unaccounted_files(tmp_path / "data", database_url) == {}


def test_concurrent_unlearn_retries_with_one_idempotency_key_create_one_job(tmp_path: Path, database_url: str) -> None:
    config = make_config(tmp_path / "data", database_url)
    with running_app(config) as server:
        c = server.client
        c.wait(c.learn("gone", *digits([0, 1])).id)
        answers = _all_at_once(8, lambda: c.unlearn("gone", idempotency_key="forget-once").id)
        assert len(answers) == 8 and len(set(answers)) == 1
        assert c.wait(answers[0]).state == pb.SUCCEEDED
        assert [e.action for e in c.audit_events(task="gone")].count("unlearn.requested") == 1
