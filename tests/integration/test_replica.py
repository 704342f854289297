"""Read replicas (``server.role = replica``): Predict from the primary's committed models, nothing written.

A primary and a replica in this process share a real PostgreSQL database and one data directory (a
shared volume), as deployed; real training on digits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import LetheClient, LetheError, pb
from tests.crash_harness import unaccounted_files
from tests.databases import fresh_postgres_database, postgres_admin_url
from tests.support import digits, make_config, running_app

pytestmark = pytest.mark.postgres


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from fresh_postgres_database(postgres_admin_url())


def _within(seconds: float, condition: Callable[[], bool], what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {seconds} s")


def _refused(client: LetheClient, task: str) -> bool:
    try:
        client.predict(task, digits([0, 1])[0][:4])
    except LetheError as error:
        return error.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE)
    return False


def _same_answers(primary: LetheClient, replica: LetheClient, task: str, x: object) -> bool:
    try:
        mine, theirs = replica.predict(task, x), primary.predict(task, x)
    except LetheError:
        return False
    return mine.model_version == theirs.model_version and mine.outputs.tobytes() == theirs.outputs.tobytes()


def test_a_replica_follows_learns_within_5_s_and_unlearns_within_2_s(tmp_path: Path, postgres_url: str) -> None:
    data_dir = tmp_path / "data"
    settings = {"training.epochs": 2}
    with running_app(make_config(data_dir, postgres_url, **settings)) as primary:
        c = primary.client
        xa, _ = digits([0, 1])
        xb, yb = digits([2, 3])
        c.wait(c.learn("a", *digits([0, 1])).id)
        replica_config = make_config(data_dir, postgres_url, **settings, **{"server.role": "replica"})
        with running_app(replica_config) as replica:
            r = replica.client
            with grpc.insecure_channel(replica.target) as channel:
                health = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="lethe.v1.Lethe"), timeout=5
                )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            assert replica.app.registry.get_sample_value("lethe_role", {"role": "replica"}) == 1.0
            assert _same_answers(c, r, "a", xa)  # serving from its first sync

            with pytest.raises(LetheError) as refused:
                r.learn("z", xb, yb)
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert refused.value.reason == "READ_REPLICA" and "primary" in refused.value.message

            learned = c.wait(c.learn("b", xb, yb).id)
            assert learned.state == pb.SUCCEEDED
            _within(5.0, lambda: _same_answers(c, r, "b", xb), "the replica answers b as the primary")

            unlearn = c.unlearn("a")
            _within(2.0, lambda: _refused(r, "a"), "the replica refuses the task being unlearned")
            assert c.wait(unlearn.id).state == pb.SUCCEEDED
            assert _refused(r, "a")
            _within(5.0, lambda: _same_answers(c, r, "b", xb), "the replica serves the unlearn's model")

            # One client of both: writes reach the primary though the replica is named first.
            with LetheClient([replica.target, primary.target], retries=3, timeout=30) as both:
                assert both.wait(both.learn("c", *digits([4, 5])).id).state == pb.SUCCEEDED
                _within(5.0, lambda: _same_answers(c, r, "c", digits([4, 5])[0]), "the replica answers c")
                answers = {both.predict("c", digits([4, 5])[0][:8]).model_version for _ in range(4)}
                assert len(answers) == 1  # reads from either server: the same model
    assert unaccounted_files(data_dir, postgres_url) == {}
