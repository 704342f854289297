"""The asyncio gRPC edge, as deployed: long streams never starve unary calls or health; keepalive,
reflection v1/v1alpha, Health/List, undecodable requests, the bearer scheme, rate-limited refusal
audit, response-size-aware limits and how ended calls are counted."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from client import pb
from protos.lethe_pb2_grpc import LetheStub
from protos.tensors import to_tensor
from server.rpc import hash_token
from tests.support import DeployedServer, deployed_server, digits, make_config, running_app

#: Epochs of a learn that keeps the worker busy for the whole test (it is cancelled at the end).
LONG_EPOCHS = 5000


def _metric(server: DeployedServer, name: str, labels: dict[str, str]) -> float:
    """A sample of the deployed server's Prometheus endpoint (0 when absent)."""
    found = re.search(r"^metrics on (http://\S+)$", server.log.read_text(), re.MULTILINE)
    assert found, "the server printed no metrics address"
    text = urllib.request.urlopen(found.group(1), timeout=5).read().decode()
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(selector)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _busy_worker(server: DeployedServer) -> tuple[pb.Job, pb.Job]:
    """A learned task ``a``, then a long learn running (``slow``) and one queued behind it (``later``)."""
    x, y = digits([0, 1])
    server.client.wait(server.client.learn("a", x, y).id, timeout=300)
    running = server.client.learn("slow", x, y, epochs=LONG_EPOCHS)
    queued = server.client.learn("later", x, y, epochs=LONG_EPOCHS)
    return running, queued


def test_64_open_watches_starve_neither_health_nor_predict(tmp_path: Path) -> None:
    with deployed_server(tmp_path / "data") as server:
        running, queued = _busy_worker(server)
        channel = grpc.insecure_channel(server.target)
        stub = LetheStub(channel)
        watches = [stub.WatchJob(pb.GetJobRequest(id=job.id)) for job in [running, queued] * 32]
        try:
            firsts = [next(w) for w in watches]  # every stream is open and answered
            assert {f.id for f in firsts} == {running.id, queued.id}
            health = health_pb2_grpc.HealthStub(channel)
            x, _ = digits([0, 1])
            for _ in range(5):
                started = time.monotonic()
                reply = health.Check(health_pb2.HealthCheckRequest(service="lethe.v1.Lethe"), timeout=1)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                assert time.monotonic() - started < 1.0
                started = time.monotonic()
                answer = stub.Predict(pb.PredictRequest(task="a", inputs=to_tensor(x[:64])), timeout=1)
                assert len(answer.classes) == 64
                assert time.monotonic() - started < 1.0
            listed = health.List(health_pb2.HealthListRequest(), timeout=1)
            assert listed.statuses["lethe.v1.Lethe"].status == health_pb2.HealthCheckResponse.SERVING
            assert listed.statuses[""].status == health_pb2.HealthCheckResponse.SERVING
        finally:
            server.client.cancel(queued.id)
            server.client.cancel(running.id)
            for w in watches:
                w.cancel()
            channel.close()


def test_aggressive_keepalive_client_keeps_its_stream(tmp_path: Path) -> None:
    with deployed_server(tmp_path / "data") as server:
        running, queued = _busy_worker(server)
        options = [
            ("grpc.keepalive_time_ms", 1000),
            ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        with grpc.insecure_channel(server.target, options=options) as channel:
            stub = LetheStub(channel)
            watch = stub.WatchJob(pb.GetJobRequest(id=queued.id))  # queued: nothing is sent for a while
            assert next(watch).state == pb.QUEUED
            time.sleep(8)  # eight client pings on a quiet stream
            stub.CancelJob(pb.GetJobRequest(id=queued.id), timeout=10)
            states = [job.state for job in watch]  # the stream survived and ends normally
            assert states[-1] == pb.CANCELLED
            assert stub.GetJob(pb.GetJobRequest(id=running.id), timeout=5).state == pb.RUNNING
        server.client.cancel(running.id)
        assert "too_many_pings" not in server.log.read_text()


def _reflect(channel: grpc.Channel, version: str, request: reflection_pb2.ServerReflectionRequest) -> Iterator[object]:
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return iter(call(iter([request]), timeout=10))


def test_reflection_v1_and_v1alpha_and_undecodable_requests(tmp_path: Path) -> None:
    with deployed_server(tmp_path / "data") as server, grpc.insecure_channel(server.target) as channel:
        for version in ("v1", "v1alpha"):
            (listed,) = _reflect(channel, version, reflection_pb2.ServerReflectionRequest(list_services=""))
            names = {s.name for s in listed.list_services_response.service}  # type: ignore[attr-defined]
            assert {
                "lethe.v1.Lethe",
                "inference.GRPCInferenceService",
                "grpc.health.v1.Health",
                f"grpc.reflection.{version}.ServerReflection",
            } <= names
            (found,) = _reflect(
                channel, version, reflection_pb2.ServerReflectionRequest(file_containing_symbol="lethe.v1.Lethe")
            )
            assert found.file_descriptor_response.file_descriptor_proto  # type: ignore[attr-defined]
            (oip,) = _reflect(  # described from the inference protocol's own descriptor pool
                channel,
                version,
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
            )
            assert oip.file_descriptor_response.file_descriptor_proto  # type: ignore[attr-defined]

        garbage = channel.unary_unary("/lethe.v1.Lethe/GetJob")  # raw bytes, no serializer
        before = _metric(server, "lethe_grpc_requests_total", {"method": "GetJob", "code": "INVALID_ARGUMENT"})
        with pytest.raises(grpc.RpcError) as refused:
            garbage(b"\xff\xff\xff\xff not a protobuf", timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid GetJob request" in (refused.value.details() or "")
        after = _metric(server, "lethe_grpc_requests_total", {"method": "GetJob", "code": "INVALID_ARGUMENT"})
        assert after == before + 1
        assert LetheStub(channel).GetModel(pb.GetModelRequest(), timeout=5).strategy  # still serving
    assert "Traceback" not in server.log.read_text()


def test_bearer_scheme_is_case_insensitive_and_refusals_are_audited_at_a_limited_rate(tmp_path: Path) -> None:
    config = make_config(
        tmp_path / "data",
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        **{"auth.enabled": True, "auth.tokens": [f"root:{hash_token('t-admin')}:admin"]},
    )
    with running_app(config, token="t-admin") as server, grpc.insecure_channel(server.target) as channel:
        stub = LetheStub(channel)
        for scheme in ("bearer", "BEARER", "Bearer"):
            stub.GetModel(pb.GetModelRequest(), metadata=(("authorization", f"{scheme} t-admin"),), timeout=5)
        for _ in range(30):
            with pytest.raises(grpc.RpcError) as refused:
                stub.GetModel(pb.GetModelRequest(), metadata=(("authorization", "Bearer wrong"),), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        registry = server.app.registry
        assert registry.get_sample_value("lethe_auth_denied_total", {"code": "UNAUTHENTICATED"}) == 30
        requests = {"method": "GetModel", "code": "UNAUTHENTICATED"}
        assert registry.get_sample_value("lethe_grpc_requests_total", requests) == 30
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the audit rows are written off the event loop
            denied = [e for e in server.client.audit_events() if e.action == "auth.denied"]
            if len(denied) == 10:
                break
            time.sleep(0.1)
        assert len(denied) == 10  # audit.denied_per_minute
        time.sleep(0.5)
        assert len([e for e in server.client.audit_events() if e.action == "auth.denied"]) == 10


def test_a_request_that_passes_validation_never_fails_on_its_response_size(tmp_path: Path) -> None:
    config = make_config(
        tmp_path / "data",
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        **{"model.num_classes": 1000, "limits.max_predict_samples": 8192, "model.strategy": "finetune"},
    )
    with running_app(config) as server:
        x, y = digits([0, 1])
        server.client.wait(server.client.learn("a", x, y).id, timeout=300)
        rows = (16 * 1024 * 1024 - 1024) // (1000 * 4 + 16)  # server.max_message_bytes, 1000 classes
        many = np.resize(x, (rows, *x.shape[1:])).astype(np.float32)
        with grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
            stub = LetheStub(channel)
            answer = stub.Predict(pb.PredictRequest(task="a", inputs=to_tensor(many)), timeout=60)
            assert len(answer.classes) == rows
            more = np.resize(x, (rows + 1, *x.shape[1:])).astype(np.float32)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Predict(pb.PredictRequest(task="a", inputs=to_tensor(more)), timeout=60)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server.max_message_bytes" in (refused.value.details() or "")
            assert str(rows) in (refused.value.details() or "")


def test_cancelled_learn_streams_are_counted_as_cancelled(tmp_path: Path) -> None:
    config = make_config(tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}")
    with running_app(config) as server, grpc.insecure_channel(server.target) as channel:
        x, y = digits([0, 1])
        release = threading.Event()

        def messages() -> Iterator[pb.LearnRequest]:
            yield pb.LearnRequest(header=pb.LearnHeader(task="t"))
            yield pb.LearnRequest(chunk=pb.SampleChunk(inputs=to_tensor(x[:10]), labels=to_tensor(y[:10])))
            release.wait(30)

        call = LetheStub(channel).Learn.future(messages())
        time.sleep(1.0)
        call.cancel()
        release.set()
        registry = server.app.registry
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if registry.get_sample_value("lethe_grpc_requests_total", {"method": "Learn", "code": "CANCELLED"}):
                break
            time.sleep(0.1)
        assert registry.get_sample_value("lethe_grpc_requests_total", {"method": "Learn", "code": "CANCELLED"}) == 1
        assert not registry.get_sample_value("lethe_grpc_requests_total", {"method": "Learn", "code": "UNAVAILABLE"})
        assert server.client.tasks() == []  # nothing half-written
