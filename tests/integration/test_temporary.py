"""Temporary learning with exact forgetting, and Commit (CLPU), through the API on both databases.

Real servers on port 0, real training on sklearn's digits, the default strategy (``uncle``) and
backbone with their default training options; the probe share is raised to 20% (as every
integration test does) so that one probe sample is about one accuracy point, not three.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from client import LetheError, pb
from client.cli import main as lethe
from tests.crash_harness import Accepted, CrashHarness
from tests.support import digits, make_config, running_app

#: The server's own defaults but for the data directory, database, port and probe share.
DEFAULTS: dict[str, Any] = {"model.strategy": "uncle", "model.width": 0, "training.epochs": 0, "training.batch_size": 0}
A, B = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]


def _config(tmp_path: Path, database_url: str, **overrides: Any) -> Any:
    return make_config(tmp_path / "data", database_url, **{**DEFAULTS, **overrides})


def _probabilities(client: Any, task: str | None, inputs: np.ndarray) -> np.ndarray:
    return np.asarray(client.predict(task, inputs, probabilities=True).outputs)


def _accuracy(client: Any, task: str | None, inputs: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(client.predict(task, inputs).classes == labels))


def _events(client: Any, task: str, action: str) -> list[dict[str, Any]]:
    return [
        {"principal": e.principal, **json.loads(e.details_json)}
        for e in client.audit_events(task=task)
        if e.action == action
    ]


def test_temporary_learn_is_served_and_its_unlearn_leaves_the_model_bit_identical(
    tmp_path: Path, database_url: str
) -> None:
    xa, ya = digits(A)
    xb, yb = digits(B)
    with running_app(_config(tmp_path, database_url)) as server:
        c = server.client
        c.wait(c.learn("a", xa, ya).id)
        before = _probabilities(c, "a", xa)
        parameters = c.model().parameters

        learned = c.wait(c.learn("b", xb, yb, temporary=True).id)
        assert learned.state == pb.SUCCEEDED and learned.metrics["temporary"] == 1.0
        task = c.task("b")
        assert task.state == pb.TEMPORARY and not task.HasField("expires_at")  # no TTL by default
        assert _accuracy(c, "b", xb, yb) >= 90  # answered by its side network
        assert np.array_equal(_probabilities(c, "a", xa), before)  # the main model answers a, untouched
        assert c.model().parameters > parameters  # the side network is counted while it lives
        # Its training data is kept, accounted, until commit or unlearn.
        files = _events(c, "b", "learn.succeeded")[0]["files"]
        assert {f["kind"] for f in files} == {"probe", "member", "retained"} and all(f["bytes"] > 0 for f in files)

        forgotten = c.wait(c.unlearn("b", reason="trial ended").id)
        assert forgotten.state == pb.SUCCEEDED and forgotten.method == "delete-side-network"
        assert forgotten.metrics["forget_verified"] == 1.0 and forgotten.metrics["side_network_deleted"] == 1.0
        assert forgotten.metrics["unlearn_seconds"] < 0.5  # deleting a network, not training
        assert forgotten.metrics["spill"] == 0.0
        assert c.task("b").state == pb.UNLEARNED and c.task("b").forget_verified
        assert math.isnan(c.task("b").accuracy)  # nothing answers it now: no stale accuracy from its side network
        assert np.array_equal(_probabilities(c, "a", xa), before)  # bit-identical
        assert c.model().parameters == parameters
        purged = _events(c, "b", "data.purged")
        assert {f["kind"] for e in purged for f in e["files"]} == {"probe", "member", "retained"}
        certificate = json.loads(c.forgetting_certificate(task="b").document)  # a signed proof, as for any unlearn
        assert json.dumps(certificate).count("retained") >= 1
        with pytest.raises(LetheError) as refused:
            c.predict("b", xb[:4])
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        # Commit of a task that is not temporary is refused, naming why.
        for name in ("a", "b"):
            with pytest.raises(LetheError) as refused:
                c.commit(name)
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "not temporary" in refused.value.message and refused.value.reason == "TASK_NOT_TEMPORARY"
        with pytest.raises(LetheError) as missing:
            c.commit("nope")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.slow_on_postgres
def test_commit_keeps_the_task_and_spares_the_others(tmp_path: Path, database_url: str) -> None:
    xa, ya = digits(A)
    xb, yb = digits(B)
    with running_app(_config(tmp_path, database_url)) as server:
        c = server.client
        c.wait(c.learn("a", xa, ya).id)
        c.wait(c.learn("b", xb, yb, temporary=True).id)
        temporary = c.task("b")
        accuracy_a = c.task("a").accuracy
        commit = c.commit("b", idempotency_key="commit-b")
        assert c.commit("b", idempotency_key="commit-b").id == commit.id  # idempotent
        with pytest.raises(LetheError) as twice:
            c.commit("b")  # a second request while the first is queued or running
        assert twice.value.code == grpc.StatusCode.FAILED_PRECONDITION
        done = c.wait(commit.id)
        assert done.state == pb.SUCCEEDED and done.kind == pb.COMMIT, done.message
        committed = c.task("b")
        assert committed.state == pb.LEARNED and committed.learned_version > temporary.learned_version
        # The task's accuracy (probe set) within 5 points of its temporary one, the others within 2.
        assert done.metrics["temporary_accuracy"] == pytest.approx(temporary.accuracy)
        assert done.metrics["task_accuracy"] >= temporary.accuracy - 5, done.metrics
        assert abs(c.task("a").accuracy - accuracy_a) <= 2 and done.metrics["spill"] <= 2, done.metrics
        assert _accuracy(c, "b", xb, yb) >= 85
        # uncle keeps no training data: the temporary task's retained data is purged at commit.
        purged = _events(c, "b", "data.purged")
        assert [f["kind"] for e in purged for f in e["files"]] == ["retained"]
        # Now a permanent task: forgotten the strategy's way, and no longer committable.
        with pytest.raises(LetheError) as refused:
            c.commit("b")
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        forget = c.wait(c.unlearn("b").id)
        assert forget.method == "" and forget.metrics["forget_verified"] == 1.0  # the default method


def test_agscl_learns_temporarily_forgets_bit_identically_and_commits(tmp_path: Path, database_url: str) -> None:
    """``agscl`` (task-incremental, one head per task): a side network serves the temporary task, deleting it
    leaves the main model bit-identical, and a commit learns the task into the main model."""
    xa, ya = digits(A)
    xb, yb = digits(B)
    config = _config(tmp_path, database_url, **{"model.strategy": "agscl", "training.epochs": 10})
    with running_app(config) as server:
        c = server.client
        c.wait(c.learn("a", xa, ya).id)
        before = _probabilities(c, "a", xa)
        parameters = c.model().parameters

        learned = c.wait(c.learn("b", xb, yb, temporary=True).id)
        assert learned.state == pb.SUCCEEDED and learned.metrics["temporary"] == 1.0, learned.message
        assert c.task("b").state == pb.TEMPORARY
        assert _accuracy(c, "b", xb, yb) >= 90  # answered by its side network
        assert np.array_equal(_probabilities(c, "a", xa), before)  # the main model answers a, untouched
        assert c.model().parameters > parameters  # the side network is counted while it lives
        forgotten = c.wait(c.unlearn("b").id)
        assert forgotten.state == pb.SUCCEEDED and forgotten.method == "delete-side-network", forgotten.message
        assert forgotten.metrics["forget_verified"] == 1.0 and forgotten.metrics["side_network_deleted"] == 1.0
        assert c.task("b").state == pb.UNLEARNED
        assert np.array_equal(_probabilities(c, "a", xa), before)  # bit-identical
        assert c.model().parameters == parameters
        with pytest.raises(LetheError) as refused:
            c.predict("b", xb[:4])
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION

        # Temporary again, under a new name, then committed into the main model.
        c.wait(c.learn("c", xb, yb, temporary=True).id)
        temporary = c.task("c")
        accuracy_a = c.task("a").accuracy
        done = c.wait(c.commit("c").id)
        assert done.state == pb.SUCCEEDED and done.kind == pb.COMMIT, done.message
        assert done.metrics["distill_weight"] > 0
        committed = c.task("c")
        assert committed.state == pb.LEARNED and committed.learned_version > temporary.learned_version
        assert done.metrics["task_accuracy"] >= temporary.accuracy - 5, done.metrics
        assert abs(c.task("a").accuracy - accuracy_a) <= 2 and done.metrics["spill"] <= 2, done.metrics
        assert _accuracy(c, "c", xb, yb) >= 85
        assert c.model().parameters > parameters  # c has a head in the main model now; no side network
        # Now a permanent task: forgotten the strategy's way.
        forget = c.wait(c.unlearn("c").id)
        assert forget.state == pb.SUCCEEDED and forget.method == "", forget.message
        assert c.task("c").state == pb.UNLEARNED


def test_temporary_tasks_expire_and_are_limited(tmp_path: Path, database_url: str) -> None:
    xa, ya = digits(A)
    xb, yb = digits(B)
    config = _config(tmp_path, database_url, **{"limits.max_temporary_tasks": 1, "training.epochs": 3})
    with running_app(config) as server:
        c = server.client
        with pytest.raises(LetheError) as permanent:
            c.learn("p", xa, ya, ttl_seconds=5)
        assert (
            permanent.value.code == grpc.StatusCode.INVALID_ARGUMENT and "header.ttl_seconds" in permanent.value.message
        )
        job = c.learn("short", xb, yb, temporary=True, ttl_seconds=2)
        with pytest.raises(LetheError) as full:
            c.learn("second", xa, ya, temporary=True)
        assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_temporary_tasks" in full.value.message
        c.wait(job.id)
        task = c.task("short")
        assert task.state == pb.TEMPORARY and task.HasField("expires_at")
        deadline = time.monotonic() + 60
        while c.task("short").state != pb.UNLEARNED and time.monotonic() < deadline:
            time.sleep(0.5)
        assert c.task("short").state == pb.UNLEARNED
        requested = _events(c, "short", "unlearn.requested")
        assert len(requested) == 1 and requested[0]["principal"] == "system:ttl"
        assert "time to live expired" in requested[0]["reason"]
        unlearn = [j for j in c.jobs(task="short") if j.kind == pb.UNLEARN]
        assert len(unlearn) == 1 and unlearn[0].metrics["forget_verified"] == 1.0
        # The slot is free again.
        c.wait(c.learn("second", xa, ya, temporary=True).id)


def test_lure_routes_temporary_megabatches_and_forgets_them_exactly(tmp_path: Path) -> None:
    xa, ya = digits(A)
    xb, yb = digits(B)
    config = _config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", **{"model.strategy": "lure"})
    with running_app(config) as server:
        c = server.client
        c.wait(c.learn("a", xa, ya).id)
        before = _probabilities(c, None, xa)
        c.wait(c.learn("b", xb, yb, temporary=True).id)
        assert _accuracy(c, None, xb, yb) >= 50  # routed to b's side network (chance over 10 classes: 10)
        forgotten = c.wait(c.unlearn("b").id)
        assert forgotten.method == "delete-side-network" and forgotten.metrics["forget_verified"] == 1.0
        assert np.array_equal(_probabilities(c, None, xa), before)  # the main model, bit for bit
        assert _accuracy(c, None, xb, yb) == 0.0  # the main model never saw b's classes


@pytest.mark.slow_on_postgres
def test_kill_during_commit_runs_it_again_once(tmp_path: Path, database_url: str) -> None:
    """kill -9 while a COMMIT runs: after the restart it runs again, once; the task ends LEARNED."""
    harness = CrashHarness(tmp_path / "data", database_url)
    try:
        client = harness.start()
        client.wait(harness.learn("a", [0, 1]).id)
        x, y = digits(list(range(2, 10)))
        temporary = client.learn("b", x, y, temporary=True, epochs=40)
        harness.accepted[temporary.id] = Accepted(temporary.id, temporary.kind, temporary.task)
        client.wait(temporary.id, timeout=240)
        commit = client.commit("b", idempotency_key="commit-b")
        harness.accepted[commit.id] = Accepted(commit.id, commit.kind, commit.task)
        harness.wait_state(commit.id, (pb.RUNNING,), min_progress=0.3)
        harness.kill()
        assert commit.id in harness.running_at_kill

        client = harness.start()
        done = client.wait(commit.id, timeout=240)
        assert done.state == pb.SUCCEEDED, done.message
        assert client.commit("b", idempotency_key="commit-b").id == commit.id  # still the same job
        assert client.task("b").state == pb.LEARNED
        events = client.audit_events(task="b")
        assert [e.action for e in events if e.job_id == commit.id].count("commit.succeeded") == 1
        assert _accuracy(client, "b", x, y) >= 85
        harness.check()
    finally:
        harness.stop()


def test_cli_learns_temporarily_and_commits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", **{"training.epochs": 3})
    with running_app(config) as server:
        at = ["--server", server.target]
        assert lethe(["learn", "trial", "--classes", "0-4", "--temporary", "--ttl", "3600", *at]) == 0
        assert "temporarily" in capsys.readouterr().out
        task = server.client.task("trial")
        assert task.state == pb.TEMPORARY and task.HasField("expires_at")
        assert lethe(["commit", "trial", *at]) == 0
        assert "commit job" in capsys.readouterr().out
        assert server.client.task("trial").state == pb.LEARNED
        assert lethe(["commit", "trial", *at]) == 1  # not temporary any more
        assert "FAILED_PRECONDITION" in capsys.readouterr().err
        assert lethe(["learn", "second", "--classes", "5-9", "--temporary", "--ttl", "3600", *at]) == 0
        capsys.readouterr()
        assert lethe(["tasks", *at]) == 0
        listed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
        assert "temporary" in listed["second"] and re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", listed["second"])
        assert "learned" in listed["trial"] and not re.search(r"\d\d:\d\d$", listed["trial"])  # committed: no expiry
        assert lethe(["unlearn", "second", *at]) == 0
        assert "forgotten exactly" in capsys.readouterr().out


def test_an_unlearn_cancels_a_queued_commit(tmp_path: Path) -> None:
    xa, ya = digits(A)
    xb, yb = digits(B)
    config = _config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", **{"model.strategy": "finetune"})
    with running_app(config) as server:
        c = server.client
        c.wait(c.learn("b", xb, yb, temporary=True, epochs=3).id)
        busy = c.learn("a", xa, ya, epochs=200)  # keeps the worker busy: the commit waits in the queue
        commit = c.commit("b")
        forget = c.unlearn("b", reason="withdrawn before the commit ran")
        assert c.job(commit.id).state == pb.CANCELLED and "unlearn" in c.job(commit.id).message
        done = c.wait(forget.id, timeout=120)  # unlearns overtake queued learns
        assert done.method == "delete-side-network" and done.metrics["forget_verified"] == 1.0
        assert c.task("b").state == pb.UNLEARNED
        assert c.wait(busy.id, timeout=240).state == pb.SUCCEEDED


def test_an_unlearn_accepted_while_the_commit_runs_forgets_the_committed_task(tmp_path: Path) -> None:
    xb, yb = digits(B)
    config = _config(tmp_path, f"sqlite:///{tmp_path / 'db.sqlite'}", **{"model.strategy": "finetune"})
    with running_app(config) as server:
        c = server.client
        c.wait(c.learn("b", xb, yb, temporary=True, epochs=150).id, timeout=240)
        commit = c.commit("b")
        deadline = time.monotonic() + 60
        while c.job(commit.id).state != pb.RUNNING and time.monotonic() < deadline:
            time.sleep(0.05)
        forget = c.unlearn("b", reason="withdrawn during the commit")
        assert forget.method == "delete-side-network"  # as accepted: the task was temporary then
        assert c.wait(commit.id, timeout=240).state == pb.SUCCEEDED
        done = c.wait(forget.id, timeout=240)
        # The commit came first, so the task was in the main model: the strategy's own unlearn ran.
        assert done.state == pb.SUCCEEDED and "side_network_deleted" not in done.metrics, done.message
        assert c.task("b").state == pb.UNLEARNED
