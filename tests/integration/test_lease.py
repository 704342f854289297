"""One writer per database: the lease, the hot standby and fencing (DESIGN.md section 9).

Real servers on port 0, real SQLite and PostgreSQL, real training on digits. Two servers share one
data directory, as a primary and its standby on a shared volume do.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from client import LetheClient, LetheError, pb
from client.audit import head_from_message, verify_audit
from protos.audit_signing import AuditPublicKey
from server.app import App
from server.lease import LeaseHeldError
from tests.crash_harness import unaccounted_files
from tests.databases import fresh_postgres_database, postgres_admin_url
from tests.support import digits, free_port, make_config, running_app, wait_ready

SERVICE = "lethe.v1.Lethe"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database (the standby exists only there)."""
    yield from fresh_postgres_database(postgres_admin_url())


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status)


def _until(condition: object, timeout: float, what: str) -> float:
    """Poll ``condition()`` until true; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def _epoch(url: str) -> int:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text("SELECT epoch FROM leases WHERE name = 'primary'")).scalar_one())
    finally:
        engine.dispose()


def test_server_and_client_name_the_primary_health_service_alike() -> None:
    from client.routing import PRIMARY_SERVICE as CLIENT_SIDE
    from server.lease import PRIMARY_SERVICE as SERVER_SIDE

    assert CLIENT_SIDE == SERVER_SIDE


def test_a_second_server_on_a_sqlite_data_directory_refuses_to_start(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", f"sqlite:///{tmp_path / 'lethe.db'}")
    with running_app(config) as first:
        second = App(config, registry=CollectorRegistry())
        with pytest.raises(LeaseHeldError) as held:
            second.start()
        second.stop(0)
        assert f"pid {os.getpid()}" in str(held.value) and "in use by another lethe serve" in str(held.value)
        assert first.client.wait(first.client.learn("a", *digits([0, 1]), epochs=1).id).state == pb.SUCCEEDED
    # The lock goes with the server: the next one starts and serves what the first learned.
    with running_app(config) as again:
        assert again.client.task("a").state == pb.LEARNED


def test_lethe_serve_on_a_taken_sqlite_data_directory_exits_in_one_line(tmp_path: Path) -> None:
    data_dir, url = tmp_path / "data", f"sqlite:///{tmp_path / 'lethe.db'}"
    with running_app(make_config(data_dir, url)):
        argv = [sys.executable, "-m", "server", "--no-auth", "--data-dir", str(data_dir), "--database-url", url]
        done = subprocess.run(
            [*argv, "--port", "0", "--metrics-port", "-1"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "is in use by another lethe serve" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.postgres
def test_a_second_primary_waits_as_a_standby_and_takes_over(tmp_path: Path, postgres_url: str) -> None:
    """A graceful stop hands over within seconds; the standby refused writes until then and then serves
    what the first learned, under a new epoch."""
    config = make_config(tmp_path / "data", postgres_url, **{"training.epochs": 2})
    with running_app(config) as primary:
        c = primary.client
        c.wait(c.learn("a", *digits([0, 1])).id)
        epoch = _epoch(postgres_url)
        registry = CollectorRegistry()
        standby = App(config, registry=registry)
        try:
            port = standby.start().grpc
            target = f"127.0.0.1:{port}"
            assert _health(target) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert registry.get_sample_value("lethe_role", {"role": "standby"}) == 1.0
            with LetheClient(target, retries=0, timeout=10) as other:
                with pytest.raises(LetheError) as refused:
                    other.learn("b", *digits([2, 3]))
                assert refused.value.code == grpc.StatusCode.UNAVAILABLE and refused.value.reason == "NOT_PRIMARY"
                assert "hot standby" in refused.value.message and f"pid {os.getpid()}" in refused.value.message
                assert other.task("a").state == pb.LEARNED  # reads are served
                with pytest.raises(LetheError) as no_model:
                    other.predict("a", digits([0, 1])[0][:4])
                assert no_model.value.code == grpc.StatusCode.UNAVAILABLE and no_model.value.reason == "NOT_PRIMARY"
                both = LetheClient([target, primary.target], retries=5, timeout=10)  # the standby first
                assert both.wait(both.learn("c", *digits([4, 5])).id).state == pb.SUCCEEDED  # to the primary
                primary.app.stop(grace=5)
                took = _until(lambda: _health(target) == health_pb2.HealthCheckResponse.SERVING, 15, "takeover")
                assert took <= 5.0
                assert _epoch(postgres_url) == epoch + 1
                assert registry.get_sample_value("lethe_role", {"role": "primary"}) == 1.0
                x, y = digits([0, 1])
                assert (other.predict("a", x).classes == y).mean() >= 0.9
                job = other.wait(other.learn("b", *digits([2, 3])).id)
                assert job.state == pb.SUCCEEDED
                # The client of both addresses finds the new primary after its old one went away.
                assert both.wait(both.learn("d", *digits([6, 7])).id).state == pb.SUCCEEDED
                assert {both.task(t).state for t in ("a", "b", "c", "d")} == {pb.LEARNED}
                both.close()
        finally:
            standby.stop(grace=5)
    assert unaccounted_files(tmp_path / "data", postgres_url) == {}


def _serve(data_dir: Path, url: str, log: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "server", "--no-auth", "--data-dir", str(data_dir), "--database-url", url]
    argv += ["--port", str(port), "--metrics-port", "-1", *extra]
    with log.open("ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    return process, f"127.0.0.1:{port}"


def _kill_the_primary_during_a_learn(tmp_path: Path, postgres_url: str, trial: int) -> float:
    """Primary and standby on one database and data directory; kill -9 the primary a trial-dependent
    moment into a learn; the standby must serve within 15 s and finish the job exactly once, with
    nothing accepted lost, the audit chain intact and every file accounted for. Returns the seconds
    from the kill to the standby's readiness."""
    data_dir, log = tmp_path / "data", tmp_path / "servers.log"
    first, first_target = _serve(data_dir, postgres_url, log)
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_ready(first_target, first, log)
        second, second_target = _serve(data_dir, postgres_url, log)
        _until(lambda: "STANDBY" in log.read_text(), 60, "the standby's start")
        with LetheClient(first_target, retries=0, timeout=30) as c:
            done_before = c.wait(c.learn("before", *digits([2, 3]), epochs=1).id)
            job = c.learn("long", *digits([0, 1]), epochs=50)  # still training at the kill, 0-2 s in
            queued = c.learn("queued", *digits([4, 5]), epochs=1)  # accepted: must not be lost
            _until(lambda: c.job(job.id).state == pb.RUNNING, 60, "the learn's start")
            time.sleep(random.Random(trial).uniform(0.0, 2.0))
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed = time.monotonic()
        wait_ready(second_target, second, log, timeout=30)
        took = time.monotonic() - killed
        assert took <= 15.0
        with LetheClient(second_target, retries=3, timeout=30) as c:
            for accepted in (job, queued):
                assert c.wait(accepted.id, timeout=600).state == pb.SUCCEEDED
            head = c.audit_head()
            events = c.audit_events()
            for accepted in (done_before, job, queued):
                assert [e.action for e in events if e.job_id == accepted.id].count("learn.succeeded") == 1
            assert {c.task(t).state for t in ("before", "long", "queued")} == {pb.LEARNED}
            report = verify_audit(
                events, public_key=AuditPublicKey.from_pem(head.public_key), head=head_from_message(head)
            )
            assert report.ok and report.unsigned == 0, report
            started = [json.loads(e.details_json).get("lease_epoch") for e in events if e.action == "server.started"]
            assert started == [1, 2]
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(60)
    assert unaccounted_files(data_dir, postgres_url) == {}
    return took


@pytest.mark.postgres
@pytest.mark.parametrize("trial", range(2))
def test_kill_9_of_the_primary_during_a_learn_the_standby_finishes_it_once(
    tmp_path: Path, postgres_url: str, trial: int
) -> None:
    _kill_the_primary_during_a_learn(tmp_path, postgres_url, trial)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("trial", range(2, 12))
def test_kill_9_of_the_primary_many_trials(tmp_path: Path, postgres_url: str, trial: int) -> None:
    _kill_the_primary_during_a_learn(tmp_path, postgres_url, trial)


@pytest.mark.postgres
def test_a_paused_primary_is_fenced_and_commits_nothing_after_the_takeover(tmp_path: Path, postgres_url: str) -> None:
    """SIGSTOP past the lease's ttl: the standby ends its lease and takes over; resumed, the old primary
    commits nothing (its learn stays with the new primary) and exits with 3."""
    data_dir, log = tmp_path / "data", tmp_path / "servers.log"
    ttl = ["--set", "server.lease_ttl_seconds=2"]
    first, first_target = _serve(data_dir, postgres_url, log, *ttl)
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_ready(first_target, first, log)
        second, second_target = _serve(data_dir, postgres_url, log, *ttl)
        _until(lambda: "STANDBY" in log.read_text(), 60, "the standby's start")
        with LetheClient(first_target, retries=0, timeout=30) as c:
            job = c.learn("paused", *digits([0, 1]), epochs=30)
        first.send_signal(signal.SIGSTOP)
        wait_ready(second_target, second, log, timeout=30)
        first.send_signal(signal.SIGCONT)
        assert first.wait(60) == 3
        with LetheClient(second_target, retries=3, timeout=30) as c:
            done = c.wait(job.id, timeout=600)
            assert done.state == pb.SUCCEEDED
            actions = [e.action for e in c.audit_events() if e.job_id == job.id]
            assert actions.count("learn.succeeded") == 1 and "learn.failed" not in actions
        assert "LOST THE PRIMARY LEASE" in log.read_text()
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
                process.wait(60)
    assert unaccounted_files(data_dir, postgres_url) == {}
