"""kill -9 at chosen and random points of learn and unlearn jobs, restart, and check that nothing was lost.

Each test drives real ``python -m server`` processes (SQLite and PostgreSQL) on one data directory and
database through :class:`tests.crash_harness.CrashHarness`, which records every job the server
acknowledged and checks, after each restart: every acknowledged job ended exactly once and nothing
else was created; the jobs running at the kill succeeded; learned tasks are LEARNED and predictable;
GetModel's version is the highest version of a successful job; the audit chain verifies; unlearned
tasks are never predictable (also while the server restarts) and their purged files are gone; no spool,
``.partial`` or ``.tmp`` file is left; the newest checkpoint is the model's version.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client import LetheError, pb
from client.audit import verify_chain
from tests.crash_harness import (
    CrashHarness,
    checkpoint_version,
    learn_chunk,
    learn_header,
    unaccounted_files,
    wait_for,
)
from tests.support import digits, make_config, running_app

ALL_DIGITS = list(range(10))


@pytest.fixture
def harness(tmp_path: Path, database_url: str) -> Iterator[CrashHarness]:
    h = CrashHarness(tmp_path / "data", database_url)
    try:
        yield h
    finally:
        print(f"\nstarts took {[round(s, 1) for s in h.start_seconds]} s; at each kill: {h.kill_log}")
        h.stop()


def test_kill_during_learn_job_completes_after_restart(harness: CrashHarness) -> None:
    """Issue #2: kill -9 during a learn job, restart: the job completes; tasks, audit chain and version are intact."""
    client = harness.start()
    first = harness.learn("first", [0, 1])
    second = harness.learn("second", [2, 3])
    assert client.wait(second.id).model_version == 2
    third = harness.learn("third", ALL_DIGITS, epochs=12)
    harness.wait_state(third.id, (pb.RUNNING,), min_progress=0.3)
    harness.kill()
    assert third.id in harness.running_at_kill
    assert checkpoint_version(harness.checkpoints()[0]) == 2

    client = harness.start()
    # Recovery kept only the newest checkpoint (the re-run third job may have added its own since).
    assert 1 not in [checkpoint_version(name) for name in harness.checkpoints()]
    done = client.wait(third.id, timeout=240)
    assert done.state == pb.SUCCEEDED and done.model_version == 3
    assert {t.name: t.state for t in client.tasks()} == {n: pb.LEARNED for n in ("first", "second", "third")}
    assert client.model().version == 3
    events = client.audit_events()
    assert verify_chain(events) is None
    assert [e.action for e in events if e.job_id == third.id].count("learn.succeeded") == 1
    assert [j.id for j in client.jobs()] == [first.id, second.id, third.id]
    assert [r.model_version for r in client.evaluations()] == [1, 2, 3]
    harness.check()


def _random_phase(harness: CrashHarness, trial: int, prefix: str) -> None:
    """Queue learns, an unlearn and a slow upload; kill at a point chosen at random by ``trial``; restart.

    The point: a random job while it runs past a random progress, the moment a random job has
    finished (its files are being purged, its snapshot published), a random delay, or just after a
    cancel of a running learn was requested (the kill lands before, during or after the cancel).
    """
    rng = random.Random(trial)
    client = harness.api
    client.wait(harness.learn(f"{prefix}0", [0, 1]).id)
    jobs = [
        harness.learn(f"{prefix}1", [2, 3, 4, 5], epochs=12),
        harness.learn(f"{prefix}2", [6, 7]),
        harness.unlearn(f"{prefix}0"),
        harness.learn(f"{prefix}3", ALL_DIGITS, epochs=3),
    ]

    # A Learn stream still uploading when the server dies must leave nothing behind.
    upload, upload_key = f"{prefix}-upload", f"{prefix}-upload-{uuid.uuid4().hex}"
    x, y = digits([8, 9])

    def slow_upload() -> None:
        def stream() -> Iterator[pb.LearnRequest]:
            yield learn_header(upload, idempotency_key=upload_key)
            for start in range(0, len(y), 40):
                time.sleep(0.1)
                yield learn_chunk(x[start : start + 40], y[start : start + 40])

        with contextlib.suppress(grpc.RpcError):  # killed mid-stream; retried after the restart below
            client.stub.Learn(stream(), timeout=60)

    uploader = threading.Thread(target=slow_upload)
    uploader.start()
    target, point = rng.choice(jobs), rng.choice(["running", "running", "finished", "delay", "cancel"])
    if point == "cancel":
        target = rng.choice([jobs[0], jobs[1], jobs[3]])  # the learns
        harness.wait_state(target.id, (pb.RUNNING, pb.SUCCEEDED), min_progress=rng.uniform(0, 0.5), interval=0.002)

        def cancel() -> None:
            with contextlib.suppress(LetheError):  # killed meanwhile, or already finished
                client.cancel(target.id)

        canceller = threading.Thread(target=cancel)
        canceller.start()
        time.sleep(rng.uniform(0, 0.3))
    elif point == "running":
        harness.wait_state(target.id, (pb.RUNNING, pb.SUCCEEDED), min_progress=rng.uniform(0, 0.9), interval=0.002)
    elif point == "finished":
        harness.wait_state(target.id, (pb.SUCCEEDED,), interval=0.002)
    else:
        time.sleep(rng.uniform(0, 2))
    harness.kill()
    uploader.join(60)
    if point == "cancel":
        canceller.join(60)

    client = harness.start()
    # A client retries an unanswered Learn with its idempotency key: the job exists once either way.
    retried = harness.learn(upload, [8, 9], key=upload_key)
    assert sum(j.task == upload for j in client.jobs(limit=1000)) == 1
    assert client.wait(retried.id, timeout=240).state == pb.SUCCEEDED
    harness.check()


@pytest.mark.slow_on_postgres
def test_kill_during_unlearns_and_at_a_random_point(harness: CrashHarness) -> None:
    client = harness.start()
    for task, classes in (("alpha", [0, 1]), ("beta", [2, 3]), ("gamma", [4, 5])):
        client.wait(harness.learn(task, classes).id)

    # 1. The unlearn of alpha waits behind a running learn: kill while alpha is UNLEARNING.
    busy = harness.learn("busy", ALL_DIGITS, epochs=12)
    harness.wait_state(busy.id, (pb.RUNNING,), min_progress=0.2)
    forget_alpha = harness.unlearn("alpha")
    assert client.task("alpha").state == pb.UNLEARNING
    harness.kill()
    client = harness.start()
    assert client.wait(forget_alpha.id, timeout=240).state == pb.SUCCEEDED
    harness.check()

    # 2. Kill the moment the unlearn of beta is seen running (or just after, if it was quicker).
    forget_beta = harness.unlearn("beta")
    seen = harness.wait_state(forget_beta.id, (pb.RUNNING, pb.SUCCEEDED), interval=0.002)
    harness.kill()
    client = harness.start()
    assert client.wait(forget_beta.id, timeout=240).state == pb.SUCCEEDED, pb.JobState.Name(seen.state)
    jobs = harness.check()
    assert {t.name: t.state for t in client.tasks()} == {
        "alpha": pb.UNLEARNED,
        "beta": pb.UNLEARNED,
        "gamma": pb.LEARNED,
        "busy": pb.LEARNED,
    }
    assert all(j.model_version > 0 for j in jobs if j.kind == pb.UNLEARN)

    # 3. Kill at a random point of a mixed queue, on the same data directory and database.
    _random_phase(harness, trial=0, prefix="r")


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(1, 26))
def test_kill_at_random_points_many_trials(harness: CrashHarness, trial: int) -> None:
    harness.start()
    _random_phase(harness, trial, prefix="t")
    harness.assert_idle_restart_changes_nothing()


def test_checkpoints_older_than_an_unlearn_are_deleted(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", f"sqlite:///{tmp_path / 'lethe.db'}", **{"training.epochs": 2})
    with running_app(config) as running:
        client = running.client
        x, y = digits([0, 1])
        client.wait(client.learn("kept", x, y).id)
        client.wait(client.learn("forgotten", *digits([2, 3])).id)
        version = client.wait(client.unlearn("forgotten").id).model_version
        checkpoints = sorted(p.name for p in (tmp_path / "data" / "checkpoints").iterdir())
        assert [checkpoint_version(name) for name in checkpoints] == [version]


def test_an_unlearn_queued_behind_its_interrupted_learn_cancels_it(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", f"sqlite:///{tmp_path / 'lethe.db'}")
    x, y = digits(ALL_DIGITS)
    with running_app(config) as running:
        client = running.client
        learn = client.learn("victim", x, y, epochs=50)
        wait_for(lambda: client.job(learn.id).state == pb.RUNNING, 60, "the learn to start")
        forget = client.unlearn("victim")
        running.app.stop(grace=0)  # interrupts the learn: the same SQL state as a kill before its checkpoint
    with running_app(config) as running:
        client = running.client
        assert client.wait(forget.id, timeout=120).state == pb.SUCCEEDED
        learned = client.wait(learn.id, timeout=120, check=False)
        assert client.task("victim").state == pb.UNLEARNED
        # The unlearn runs first (unlearns before learns): the learn never reaches the model.
        assert learned.state == pb.CANCELLED, f"{pb.JobState.Name(learned.state)}: {learned.message}"
        assert unaccounted_files(tmp_path / "data", f"sqlite:///{tmp_path / 'lethe.db'}") == {}
