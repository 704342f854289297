"""Bearer tokens with scopes, TLS and mutual TLS, against a real server."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import LetheClient, LetheError, pb
from server.rpc import hash_token
from tests.support import digits, make_config, running_app

TOKENS = {"admin": "t-admin", "trainer": "t-trainer", "reader": "t-reader"}
ENTRIES = (
    f"root:{hash_token('t-admin')}:admin",
    f"trainer:{hash_token('t-trainer')}:learn+predict",
    f"reader:{hash_token('t-reader')}:predict",
)


def _code(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(LetheError) as error:
        call()
    return error.value.code  # type: ignore[no-any-return]


def test_tokens_and_scopes(tmp_path: Path) -> None:
    config = make_config(
        tmp_path / "data", f"sqlite:///{tmp_path / 'db.sqlite'}", **{"auth.enabled": True, "auth.tokens": list(ENTRIES)}
    )
    with running_app(config, token=TOKENS["trainer"]) as server:
        x, y = digits([0, 1])
        job = server.client.wait(server.client.learn("t", x, y).id)  # learn scope
        assert server.client.predict("t", x[:4]).classes.shape == (4,)
        with LetheClient(server.target) as anonymous:
            assert _code(lambda: anonymous.tasks()) == grpc.StatusCode.UNAUTHENTICATED
            assert _code(lambda: anonymous.predict("t", x[:2])) == grpc.StatusCode.UNAUTHENTICATED
        with LetheClient(server.target, token="wrong") as guesser:
            assert _code(lambda: guesser.tasks()) == grpc.StatusCode.UNAUTHENTICATED
        with LetheClient(server.target, token=TOKENS["reader"]) as reader:
            assert reader.predict("t", x[:2]).classes.shape == (2,)
            assert _code(lambda: reader.learn("r", x, y)) == grpc.StatusCode.PERMISSION_DENIED
            assert _code(lambda: reader.unlearn("t")) == grpc.StatusCode.PERMISSION_DENIED
            assert _code(lambda: reader.audit_events()) == grpc.StatusCode.PERMISSION_DENIED
            assert _code(lambda: reader.audit_head()) == grpc.StatusCode.PERMISSION_DENIED
            assert _code(lambda: reader.forgetting_certificate(task="t")) == grpc.StatusCode.PERMISSION_DENIED
            assert reader.job(job.id).state == pb.SUCCEEDED  # status reads need any valid token
        assert _code(lambda: server.client.unlearn("t")) == grpc.StatusCode.PERMISSION_DENIED
        with LetheClient(server.target, token=TOKENS["admin"]) as admin:
            admin.wait(admin.unlearn("t", reason="audit").id)
            assert admin.audit_head().seq > 0
            assert json.loads(admin.forgetting_certificate(task="t").document)["issued_to"] == "root"
            events = admin.audit_events()
        with grpc.insecure_channel(server.target) as channel:  # health stays open
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    by_action = {e.action: e for e in events}
    assert by_action["learn.requested"].principal == "trainer"
    assert by_action["unlearn.requested"].principal == "root"
    denied = [json.loads(e.details_json) for e in events if e.action == "auth.denied"]
    assert {"UNAUTHENTICATED", "PERMISSION_DENIED"} <= {d["code"] for d in denied}
    # No token ever lands in the audit trail.
    assert not [e.seq for e in events for token in TOKENS.values() if token in e.details_json]


def _certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    ca: bool,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_mutual_tls_refuses_a_client_without_a_valid_certificate(tmp_path: Path) -> None:
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("lethe-test-ca", ca_key, None, None, ca=True)
    rogue_ca = _certificate("rogue-ca", other_key, None, None, ca=True)
    server_key, client_key, rogue_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    server_cert = _certificate("localhost", server_key, ca, ca_key, ca=False)
    client_cert = _certificate("alice", client_key, ca, ca_key, ca=False)
    rogue_cert = _certificate("mallory", rogue_key, rogue_ca, other_key, ca=False)
    files = {"ca.pem": _pem(ca), "server.pem": _pem(server_cert), "server.key": _key_pem(server_key)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    config = make_config(
        tmp_path / "data",
        f"sqlite:///{tmp_path / 'db.sqlite'}",
        **{
            "server.host": "localhost",
            "server.tls_cert": str(tmp_path / "server.pem"),
            "server.tls_key": str(tmp_path / "server.key"),
            "server.tls_client_ca": str(tmp_path / "ca.pem"),
        },
    )
    from prometheus_client import CollectorRegistry

    from server.app import App

    app = App(config, registry=CollectorRegistry())
    port = app.start().grpc
    target = f"localhost:{port}"
    try:
        with LetheClient(
            target,
            root_certificates=_pem(ca),
            certificate_chain=_pem(client_cert),
            private_key=_key_pem(client_key),
            retries=1,
        ) as good:
            assert good.model().strategy == "finetune"
        with LetheClient(target, root_certificates=_pem(ca), retries=1, timeout=5) as no_cert:
            assert _code(lambda: no_cert.model()) == grpc.StatusCode.UNAVAILABLE
        with LetheClient(
            target,
            root_certificates=_pem(ca),
            certificate_chain=_pem(rogue_cert),
            private_key=_key_pem(rogue_key),
            retries=1,
            timeout=5,
        ) as rogue:
            assert _code(lambda: rogue.model()) == grpc.StatusCode.UNAVAILABLE
        with LetheClient(target, retries=1, timeout=5) as plaintext:
            assert _code(lambda: plaintext.model()) == grpc.StatusCode.UNAVAILABLE
    finally:
        app.stop(0)
