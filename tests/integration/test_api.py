"""Every RPC through a real server on port 0, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import AlreadyExistsError, InvalidArgumentError, LetheError, NotFoundError, pb
from client.audit import verify_chain
from tests.support import digits, make_config, running_app


@pytest.fixture
def server(tmp_path: Path, database_url: str):  # type: ignore[no-untyped-def]
    with running_app(make_config(tmp_path / "data", database_url)) as running:
        yield running


def test_learn_predict_unlearn_round_trip(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client = server.client
    x01, y01 = digits([0, 1])
    x23, y23 = digits([2, 3])
    job_a = client.learn("zero-one", x01, y01, metadata={"source": "test"})
    assert job_a.state == pb.QUEUED and job_a.kind == pb.LEARN and job_a.task == "zero-one"
    job_a = client.wait(job_a.id)
    assert job_a.state == pb.SUCCEEDED and job_a.model_version == 1
    assert job_a.metrics["task_accuracy"] >= 90
    job_b = client.wait(client.learn("two-three", x23, y23).id)
    assert job_b.model_version == 2

    prediction = client.predict("zero-one", x01[:50])
    assert prediction.outputs.shape == (50, 10) and prediction.model_version == 2
    assert np.mean(prediction.classes == y01[:50]) >= 0.9
    assert set(prediction.classes) <= {0, 1}  # task-incremental: only the task's classes
    probs = client.predict("two-three", x23[:10], probabilities=True).outputs
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    task = client.task("zero-one")
    assert task.state == pb.LEARNED and task.samples == len(y01) and list(task.classes) == [0, 1]
    assert task.accuracy >= 90 and math.isnan(task.relapse)

    unlearn = client.wait(client.unlearn("zero-one", reason="customer request").id)
    assert unlearn.kind == pb.UNLEARN and unlearn.model_version == 3
    assert "spill" in unlearn.metrics and "purged_bytes" in unlearn.metrics and unlearn.metrics["purged_bytes"] > 0
    assert unlearn.metrics["spill"] < 1e-6  # finetune deletes a head: nothing else can move
    with pytest.raises(LetheError) as refused:
        client.predict("zero-one", x01[:5])
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION and "unlearned" in refused.value.message
    audited = client.predict("zero-one", x01, allow_unlearned=True)  # an auditor's check (admin, audited)
    assert audited.outputs.shape == (len(y01), 10) and set(audited.classes) <= {0, 1}

    states = {t.name: t.state for t in client.tasks()}
    assert states == {"zero-one": pb.UNLEARNED, "two-three": pb.LEARNED}
    assert [j.id for j in client.jobs()] == [job_a.id, job_b.id, unlearn.id]
    assert client.jobs(after_seq=job_a.seq, limit=1)[0].id == job_b.id

    rows = client.evaluations()
    assert [r.job_id for r in rows] == [job_a.id, job_b.id, unlearn.id]
    assert set(rows[1].accuracies) == {"zero-one", "two-three"}

    info = client.model()
    assert info.strategy == "finetune" and info.version == 3 and list(info.input_shape) == [1, 8, 8]
    assert info.num_classes == 10 and info.parameters > 0 and info.task_incremental

    events = client.audit_events()
    assert verify_chain(events) is None
    actions = [e.action for e in events]
    for action in (
        "learn.requested",
        "learn.succeeded",
        "unlearn.requested",
        "unlearn.succeeded",
        "data.purged",
        "predict.unlearned",
    ):
        assert action in actions
    purge = next(e for e in events if e.action == "data.purged" and e.task == "zero-one")
    files = json.loads(purge.details_json)["files"]
    assert {f["kind"] for f in files} >= {"member"} and all(len(f["sha256"]) == 64 for f in files)
    for f in files:
        assert not (tmp_path / "data" / f["path"]).exists()
    assert next(e.action for e in client.audit_events(task="two-three")) == "learn.requested"


def test_watch_streams_until_terminal(server) -> None:  # type: ignore[no-untyped-def]
    x, y = digits([4, 5])
    # Long enough (about a second) for several progress updates at WatchJob's 10 per second, on an idle machine too.
    job = server.client.learn("four-five", x, y, epochs=100)
    updates = list(server.client.watch(job.id))
    states = [u.state for u in updates]
    assert states[-1] == pb.SUCCEEDED and states.count(pb.SUCCEEDED) == 1
    assert states == sorted(states, key=[pb.QUEUED, pb.RUNNING, pb.SUCCEEDED].index)  # never backwards
    running = [u.progress for u in updates if u.state == pb.RUNNING]
    assert len(running) >= 2 and running == sorted(running)  # progress is streamed, and only grows
    assert updates[-1].progress == 1.0


def test_idempotent_retries_create_one_job(server) -> None:  # type: ignore[no-untyped-def]
    x, y = digits([6, 7])
    first = server.client.learn("six-seven", x, y, idempotency_key="same-key")
    again = server.client.learn("six-seven", x, y, idempotency_key="same-key")
    assert again.id == first.id
    assert len(server.client.jobs()) == 1
    server.client.wait(first.id)
    u1 = server.client.unlearn("six-seven", idempotency_key="forget-key")
    u2 = server.client.unlearn("six-seven", idempotency_key="forget-key")
    assert u1.id == u2.id
    with pytest.raises(LetheError) as reused:
        server.client.learn("other", x, y, idempotency_key="same-key")
    assert reused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert len(server.client.jobs()) == 2


def test_unlearn_of_queued_learn_cancels_it_and_data_never_reaches_model(server) -> None:  # type: ignore[no-untyped-def]
    x, y = digits([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    slow = server.client.learn("slow", x, y, epochs=200)
    x8, y8 = digits([8, 9])
    queued = server.client.learn("queued", x8, y8)
    forget = server.client.unlearn("queued", reason="withdrawn before training")
    assert forget.state == pb.SUCCEEDED and "never reached" in forget.message
    assert server.client.job(queued.id).state == pb.CANCELLED
    assert server.client.task("queued").state == pb.UNLEARNED
    assert server.client.job(slow.id).state in (pb.QUEUED, pb.RUNNING)  # interrupted by the fixture's stop


def test_cancel_queued_job_and_errors(server) -> None:  # type: ignore[no-untyped-def]
    client = server.client
    x, y = digits(list(range(10)))
    busy = client.learn("busy", x, y, epochs=30)
    x2, y2 = digits([2, 3])
    waiting = client.learn("waiting", x2, y2)
    cancelled = client.cancel(waiting.id)
    assert cancelled.state == pb.CANCELLED
    with pytest.raises(LetheError) as again:
        client.cancel(waiting.id)
    assert again.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(LetheError) as missing:
        client.task("waiting")  # a cancelled learn frees the name: the task never existed in the model
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFoundError) as unknown_job:
        client.job("0" * 32)
    assert unknown_job.value.code == grpc.StatusCode.NOT_FOUND and unknown_job.value.reason == "JOB_NOT_FOUND"
    with pytest.raises(InvalidArgumentError) as bad_id:
        client.job("../etc/passwd")
    assert bad_id.value.code == grpc.StatusCode.INVALID_ARGUMENT and "id" in bad_id.value.message
    assert bad_id.value.field == "id" and bad_id.value.reason == "INVALID_JOB_ID"
    with pytest.raises(LetheError) as unknown_task:
        client.unlearn("nobody")
    assert unknown_task.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(LetheError) as learning:
        client.predict("busy", x[:3])
    assert learning.value.code == grpc.StatusCode.FAILED_PRECONDITION
    client.wait(busy.id)
    with pytest.raises(AlreadyExistsError) as twice:  # a name that exists (gRPC status guide: ALREADY_EXISTS)
        client.learn("busy", x, y)
    assert twice.value.code == grpc.StatusCode.ALREADY_EXISTS and "already learned" in twice.value.message
    assert twice.value.reason == "TASK_EXISTS" and twice.value.metadata == {"task": "busy", "state": "learned"}
    with pytest.raises(LetheError) as method:
        client.unlearn("busy", method="scrub")
    assert method.value.code == grpc.StatusCode.INVALID_ARGUMENT and "delete-head" in method.value.message


@pytest.mark.slow_on_postgres
def test_predict_keeps_answering_while_a_job_trains(server) -> None:  # type: ignore[no-untyped-def]
    client = server.client
    x, y = digits([0, 1])
    client.wait(client.learn("served", x, y).id)
    xa, ya = digits(list(range(10)))
    training = client.learn("training", xa, ya, epochs=20)  # about 10 s of training under four Predict clients
    errors: list[BaseException] = []
    answered = 0
    versions: set[int] = set()
    stop = threading.Event()

    def hammer() -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                p = client.predict("served", x[:64])
                versions.add(p.model_version)
                assert np.mean(p.classes == y[:64]) >= 0.9
                answered += 1
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    done = client.wait(training.id)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert answered > 20
    assert done.state == pb.SUCCEEDED and versions <= {1, 2}


def test_health_and_reflection(server) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "lethe.v1.Lethe"):
            assert (
                stub.Check(health_pb2.HealthCheckRequest(service=service)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {"lethe.v1.Lethe", "grpc.health.v1.Health"} <= names
