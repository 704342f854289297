"""``storage.blob_url = "postgresql"``: every spool, task-data file and checkpoint lives in the database.

Real servers on real PostgreSQL, real training on digits: a server that learns, predicts, forgets
samples, unlearns and restarts keeps no task data in its data directory, and purges reach the
blobs with the same proofs; a primary, a standby and a replica with three different data directories
(no shared volume) serve the same models, across a kill -9 of the primary.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from client import LetheClient, LetheError, pb
from server.data.layout import CHECKPOINTS, FOLDERS
from tests.crash_harness import unaccounted_blobs
from tests.databases import fresh_postgres_database, postgres_admin_url
from tests.support import ServerProcess, digits, make_config, running_app

pytestmark = pytest.mark.postgres

BLOBS_IN_POSTGRES = {"storage.blob_url": "postgresql"}


@pytest.fixture
def postgres_url() -> Iterator[str]:
    yield from fresh_postgres_database(postgres_admin_url())


def _task_data_on_disk(data_dir: Path) -> list[str]:
    """Every file in the data directory's spool, probes, members, retained and checkpoints folders."""
    folders = [*FOLDERS.values(), CHECKPOINTS]
    return sorted(
        str(p.relative_to(data_dir)) for f in folders if (data_dir / f).exists() for p in (data_dir / f).rglob("*")
    )


def _query(url: str, sql: str) -> list[tuple[object, ...]]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql)).all()]
    finally:
        engine.dispose()


def _within(seconds: float, condition: Callable[[], bool], what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if condition():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {seconds} s")


def _purged_files(client: LetheClient, job_id: str) -> list[dict[str, object]]:
    events = [e for e in client.audit_events() if e.action == "data.purged" and e.job_id == job_id]
    return [entry for e in events for entry in json.loads(e.details_json)["files"]]


def test_learn_forget_unlearn_and_restart_keep_no_task_data_on_disk(tmp_path: Path, postgres_url: str) -> None:
    data_dir = tmp_path / "data"
    settings = {"training.retain_training_data": True, "training.forget_probe_ops": 0}  # probes purged at once too
    config = make_config(data_dir, postgres_url, **BLOBS_IN_POSTGRES, **settings)
    xa, ya = digits([0, 1])
    xb, yb = digits([2, 3])
    ids_a = [f"a-{i}" for i in range(len(ya))]
    with running_app(config) as server:
        c = server.client
        assert c.wait(c.learn("a", xa, ya, sample_ids=ids_a).id).state == pb.SUCCEEDED
        learned_b = c.wait(c.learn("b", xb, yb).id)
        assert learned_b.state == pb.SUCCEEDED
        assert (c.predict("a", xa).classes == ya).mean() >= 0.9
        assert _task_data_on_disk(data_dir) == []  # nothing but the database, keys and the audit head
        stored = dict(_query(postgres_url, "SELECT path, sha256 FROM blobs WHERE path IS NOT NULL"))
        rows_b = dict(
            _query(postgres_url, "SELECT path, sha256 FROM data_files WHERE task = 'b' AND purged_at IS NULL")
        )
        assert rows_b and all(stored[path] == digest for path, digest in rows_b.items())

        forget = c.wait(c.forget_samples(ids_a[:10], reason="erasure request").id)
        assert forget.state == pb.SUCCEEDED and forget.metrics["samples_forgotten"] == 10
        unlearn = c.wait(c.unlearn("b").id)
        assert unlearn.state == pb.SUCCEEDED
        answer = c.predict("a", xa)

        # The purge proofs: every file of b was present in the blob store, with the recorded bytes.
        proof = _purged_files(c, unlearn.id)
        assert {str(e["path"]) for e in proof} == set(rows_b)
        assert all(e["at_deletion"] == "present" and e["sha256_at_deletion"] == e["sha256"] for e in proof)
        rewritten = _purged_files(c, forget.id)
        assert rewritten and all(e["at_deletion"] == "present" and not e["mismatch"] for e in rewritten)
        assert unaccounted_blobs(postgres_url) == {}
        purged = {str(r[0]) for r in _query(postgres_url, "SELECT path FROM data_files WHERE purged_at IS NOT NULL")}
        assert set(rows_b) <= purged
        assert not purged & {str(r[0]) for r in _query(postgres_url, "SELECT pending_path FROM blobs")}
        assert _task_data_on_disk(data_dir) == []

    with running_app(config) as again:
        c = again.client
        assert c.task("b").state == pb.UNLEARNED
        same = c.predict("a", xa)
        assert same.model_version == answer.model_version and same.outputs.tobytes() == answer.outputs.tobytes()
        assert c.wait(c.learn("c", *digits([4, 5])).id).state == pb.SUCCEEDED
        assert _task_data_on_disk(data_dir) == []
        assert unaccounted_blobs(postgres_url) == {}


def _shared_secrets(directory: Path) -> list[str]:
    """The keys every server of one deployment shares (Kubernetes: Secrets), as ``--set`` arguments."""
    directory.mkdir()
    audit_key = directory / "audit-ed25519.pem"
    audit_key.write_bytes(Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    sample_key = directory / "sample-ids.key"
    sample_key.write_bytes(secrets.token_bytes(32))
    for key in (audit_key, sample_key):
        key.chmod(0o600)
    return [
        "--set",
        "storage.blob_url=postgresql",
        "--set",
        f"audit.signing_key_file={audit_key}",
        "--set",
        f"storage.sample_id_key_file={sample_key}",
    ]


def _answers(target: str) -> bool:
    """Whether the server at ``target`` answers health checks (a standby answers NOT_SERVING)."""
    with grpc.insecure_channel(target) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return False
    return True


def _same(one: LetheClient, other: LetheClient, task: str, x: np.ndarray) -> bool:
    try:
        mine, theirs = one.predict(task, x), other.predict(task, x)
    except LetheError:
        return False
    return mine.model_version == theirs.model_version and mine.outputs.tobytes() == theirs.outputs.tobytes()


def test_primary_standby_and_replica_with_separate_data_directories(tmp_path: Path, postgres_url: str) -> None:
    """kill -9 of the primary: the standby (its own data directory) serves the same model; the replica follows."""
    shared = _shared_secrets(tmp_path / "secrets")
    xa, ya = digits([0, 1])
    xb, yb = digits([2, 3])
    servers: list[ServerProcess] = []
    try:
        primary = ServerProcess(tmp_path / "primary", postgres_url, *shared)
        servers.append(primary)
        primary.wait_ready(120)
        with LetheClient(primary.target, retries=3, timeout=60) as p:
            assert p.wait(p.learn("a", xa, ya, sample_ids=[f"a-{i}" for i in range(len(ya))]).id).state == pb.SUCCEEDED
            before = p.predict("a", xa)
        standby = ServerProcess(tmp_path / "standby", postgres_url, *shared)
        replica = ServerProcess(tmp_path / "replica", postgres_url, *shared, "--set", "server.role=replica")
        servers += [standby, replica]
        replica.wait_ready(120)
        _within(120, lambda: _answers(standby.target), "the standby listens")
        with LetheClient(replica.target, retries=3, timeout=60) as r:
            assert r.predict("a", xa).outputs.tobytes() == before.outputs.tobytes()

        primary.kill()
        standby.wait_ready(30)
        with (
            LetheClient(standby.target, retries=3, timeout=60) as s,
            LetheClient(replica.target, retries=3, timeout=60) as r,
        ):
            after = s.predict("a", xa)
            assert after.model_version == before.model_version and after.outputs.tobytes() == before.outputs.tobytes()
            assert s.locate(["a-0", "a-1", "nobody"]).tasks["a"] == 2  # the shared sample-id key
            assert s.wait(s.learn("b", xb, yb).id).state == pb.SUCCEEDED
            _within(5, lambda: _same(s, r, "b", xb), "the replica answers b as the new primary")
            unlearn = s.wait(s.unlearn("a").id)
            assert unlearn.state == pb.SUCCEEDED
            assert all(e["at_deletion"] == "present" for e in _purged_files(s, unlearn.id))
        for server in servers:
            assert _task_data_on_disk(server.data_dir) == [], server.data_dir
        assert unaccounted_blobs(postgres_url) == {}
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.terminate()
