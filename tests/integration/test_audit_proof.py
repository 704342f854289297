"""Proof that survives a database administrator (DESIGN.md section 9), against a real server on port 0.

A server learns two tasks and forgets one; then someone with write access to the database rewrites
the newest audit events (recomputing every hash and the stored head) or deletes them (putting back
an older signed head). The hash chain alone cannot tell; the signatures, the head published outside
the database and the CLI can, and name the first bad event. A forgetting certificate fetched with
``lethe proof`` verifies offline, and fails when one byte changes or when checked with another key.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from client import LetheError, pb
from client.audit import verify_certificate
from client.cli import main as lethe
from protos.audit_chain import certificate_signing_message
from protos.audit_signing import AuditPublicKey, AuditSigningKey
from server.config import ConfigError
from server.storage import AuditLog, make_engine, make_session_factory
from tests.crash_harness import unaccounted_files
from tests.support import Running, digits, make_config, running_app
from tests.tampering import rewrite_audit_suffix


@dataclass
class Forgotten:
    """A server that learned ``kept`` and ``forgotten`` and unlearned ``forgotten``."""

    running: Running
    data_dir: Path
    database_url: str
    unlearn: pb.Job
    public_key: Path

    @property
    def at(self) -> list[str]:
        return ["--server", self.running.target]


@pytest.fixture
def forgotten(tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]) -> Iterator[Forgotten]:
    data_dir = tmp_path / "data"
    with running_app(make_config(data_dir, database_url)) as running:
        c = running.client
        c.wait(c.learn("kept", *digits([0, 1])).id)
        c.wait(c.learn("forgotten", *digits([2, 3])).id)
        unlearn = c.wait(c.unlearn("forgotten", reason="customer 4711 asked").id)
        # The unlearn's commit is followed by the pruning of the older checkpoint: wait for its proof.
        assert unaccounted_files(data_dir, database_url) == {}
        public_key = tmp_path / "lethe-audit.pub"
        assert lethe(["audit", "public-key", "--out", str(public_key), "--server", running.target]) == 0
        assert "fingerprint" in capsys.readouterr().out
        assert public_key.read_text() == (data_dir / "keys" / "audit-ed25519.pub").read_text()
        yield Forgotten(running, data_dir, database_url, unlearn, public_key)


def _stored_head(database_url: str) -> tuple[int, str]:
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            head = AuditLog.head(session)
    finally:
        engine.dispose()
    return head.seq, head.hash


def _verify(database_url: str, key: AuditPublicKey | None = None) -> tuple[bool, int | None]:
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine)() as session:
            result = AuditLog().verify(session, public_key=key)
    finally:
        engine.dispose()
    return result.ok, result.first_bad_seq


def _metric_heads(registry: CollectorRegistry) -> list[tuple[float, dict[str, str]]]:
    return [
        (sample.value, sample.labels)
        for metric in registry.collect()
        if metric.name == "lethe_audit_head"
        for sample in metric.samples
    ]


def test_a_rewritten_suffix_is_named_by_the_public_key(
    forgotten: Forgotten, capsys: pytest.CaptureFixture[str]
) -> None:
    f, url = forgotten, forgotten.database_url
    key = AuditPublicKey.from_pem(f.public_key.read_bytes())
    assert lethe(["audit", "verify", "--public-key", str(f.public_key), *f.at]) == 0
    assert "audit chain intact" in capsys.readouterr().out
    seq, original = _stored_head(url)
    head_file = json.loads((f.data_dir / "audit-head.json").read_text())
    assert (head_file["seq"], head_file["hash"]) == (seq, original)
    assert head_file["public_key_fingerprint"] == key.fingerprint
    assert [(value, labels["hash"]) for value, labels in _metric_heads(f.running.app.registry)] == [(seq, original)]

    engine = make_engine(url)
    try:
        rewrite_audit_suffix(engine, seq - 2)  # the last three events, every hash and the head recomputed
    finally:
        engine.dispose()

    assert _verify(url) == (True, None)  # the attack is real: the unkeyed chain is consistent
    assert _verify(url, key) == (False, seq - 2)  # the first rewritten event is named
    assert lethe(["audit", "verify", "--public-key", str(f.public_key), *f.at]) == 1
    assert f"AUDIT CHAIN BROKEN at seq {seq - 2}:" in capsys.readouterr().err
    assert lethe(["audit", "--verify", *f.at]) == 1  # the old spelling verifies signatures too
    capsys.readouterr()
    # The head published outside the database still names the original event.
    stored_seq, forged = _stored_head(url)
    assert stored_seq == seq and forged != original
    assert json.loads((f.data_dir / "audit-head.json").read_text())["hash"] == original
    assert [labels["hash"] for _, labels in _metric_heads(f.running.app.registry)] == [original]


def test_a_rewrite_while_the_server_was_down_is_recorded_at_its_next_start(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(tmp_path / "data", database_url)
    with running_app(config) as running:
        running.client.wait(running.client.learn("a", *digits([0, 1])).id)
        running.client.wait(running.client.learn("b", *digits([2, 3])).id)
        assert unaccounted_files(tmp_path / "data", database_url) == {}
    seq, _ = _stored_head(database_url)
    engine = make_engine(database_url)
    try:
        rewrite_audit_suffix(engine, seq - 2, strip_signatures=True)
    finally:
        engine.dispose()
    with running_app(config) as running:
        events = running.client.audit_events()
        mismatch = [e for e in events if e.action == "audit.head_mismatch"]
        assert len(mismatch) == 1 and "rewritten" in json.loads(mismatch[0].details_json)["problem"]
        assert json.loads(mismatch[0].details_json)["published_head"]["seq"] == seq
        assert lethe(["audit", "verify", "--server", running.target]) == 1
        err = capsys.readouterr().err
        assert f"at seq {seq - 2}:" in err and "unsigned after signed" in err
    # Even a rewrite of the whole log with every signature removed (an unsigned log "from before signing")
    # is reported: the server recorded at its start that its published head disagreed.
    engine = make_engine(database_url)
    try:
        rewrite_audit_suffix(engine, 1, strip_signatures=True)
    finally:
        engine.dispose()
    with running_app(config) as running:
        assert lethe(["audit", "verify", "--server", running.target]) == 1
        assert "AUDIT TRAIL TAMPERED" in capsys.readouterr().err


def test_deleting_the_newest_events_is_caught_by_the_published_head(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    with running_app(make_config(data_dir, database_url)) as running:
        c, at = running.client, ["--server", running.target]
        c.wait(c.learn("a", *digits([0, 1])).id)
        assert unaccounted_files(data_dir, database_url) == {}
        old = c.audit_head()  # a validly signed head, from the past
        c.wait(c.learn("b", *digits([2, 3])).id)
        assert unaccounted_files(data_dir, database_url) == {}
        key = AuditPublicKey.from_pem(old.public_key)
        (tmp_path / "key.pub").write_text(old.public_key)
        engine = make_engine(database_url)
        try:  # the newest events go, and the head row is put back to the old signed head
            with engine.begin() as connection:
                connection.execute(text("DELETE FROM audit_events WHERE seq > :seq"), {"seq": old.seq})
                connection.execute(
                    text("UPDATE audit_head SET last_seq = :seq, last_hash = :hash, signature = :signature"),
                    {"seq": old.seq, "hash": old.hash, "signature": old.signature},
                )
        finally:
            engine.dispose()
        assert _verify(database_url, key) == (True, None)  # chain, signatures and stored head agree
        assert lethe(["audit", "verify", "--public-key", str(tmp_path / "key.pub"), *at]) == 1
        err = capsys.readouterr().err
        assert f"AUDIT CHAIN BROKEN at seq {old.seq + 1}:" in err and "newest events were deleted" in err
        head_file = ["--head-file", str(data_dir / "audit-head.json"), "--public-key", str(tmp_path / "key.pub")]
        assert lethe(["db", "verify-audit", "--database-url", database_url, *head_file]) == 1
        assert "newest events were deleted" in capsys.readouterr().err


def test_a_forgetting_certificate_verifies_offline_and_fails_when_edited(
    forgotten: Forgotten, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f, c = forgotten, forgotten.running.client
    cert = tmp_path / "forgotten.cert.json"
    assert lethe(["proof", "forgotten", "--out", str(cert), *f.at]) == 0
    assert "forgot task 'forgotten'" in capsys.readouterr().out
    assert lethe(["proof", "verify", str(cert), "--public-key", str(f.public_key)]) == 0
    out = capsys.readouterr()
    assert "certificate valid" in out.out and "trusted public key" in out.out
    assert lethe(["proof", "verify", str(cert)]) == 0
    assert "integrity only, not origin" in capsys.readouterr().err

    data = cert.read_bytes()
    document = json.loads(json.loads(data)["document"])
    request, outcome = document["request"], document["outcome"]
    assert (request["job_id"], request["task"], request["kind"]) == (f.unlearn.id, "forgotten", "task")
    assert (request["reason"], request["principal"]) == ("customer 4711 asked", "anonymous")
    assert request["created_at"] and request["finished_at"]
    assert outcome["model_version"] == f.unlearn.model_version == 3
    assert {"forget_verified", "forget_gap", "forget_reference", "mia", "spill"} <= set(document["verification"])
    deleted = {d["path"]: d for d in document["deleted"]}
    members = [d for d in deleted.values() if d.get("kind") == "member"]
    assert members and all(d["at_deletion"] == "present" and len(d["sha256_at_deletion"]) == 64 for d in members)
    older = [d for d in deleted.values() if d.get("kind") == "checkpoint"]
    assert older and all(d["model_version"] < 3 and d["action"] == "checkpoint.pruned" for d in older)
    assert [h["kind"] for h in document["still_held"]] == ["probe"]  # kept to measure relapse, and said so
    assert document["audit"]["public_key_fingerprint"] == AuditPublicKey.from_pem(f.public_key.read_bytes()).fingerprint
    issued = [e for e in c.audit_events(task="forgotten") if e.action == "proof.issued"]
    assert (
        len(issued) == 1
        and json.loads(issued[0].details_json)["certificate_sha256"]
        == hashlib.sha256(json.loads(data)["document"].encode()).hexdigest()
    )

    # One byte changed anywhere in the file: the document, the signature, the key or the framing.
    key = AuditPublicKey.from_pem(f.public_key.read_bytes())
    for position in range(len(data)):
        edited = bytearray(data)
        edited[position] ^= 0x01
        check = verify_certificate(bytes(edited), key)
        assert not check.ok, f"a change at byte {position} ({data[position : position + 1]!r}) went unnoticed"
    start = data.index(b'"document"') + 40
    edited = bytearray(data)
    edited[start] ^= 0x01
    (tmp_path / "edited.json").write_bytes(bytes(edited))
    assert lethe(["proof", "verify", str(tmp_path / "edited.json"), "--public-key", str(f.public_key)]) == 1
    assert "CERTIFICATE INVALID" in capsys.readouterr().err

    # Another key: refused; and a document re-signed by someone else's key only passes as "integrity".
    other = AuditSigningKey.generate()
    (tmp_path / "other.pub").write_text(other.public_key.pem)
    assert lethe(["proof", "verify", str(cert), "--public-key", str(tmp_path / "other.pub")]) == 1
    assert "another key" in capsys.readouterr().err
    forged_document = json.dumps({"public_key": other.public_key.pem, "summary": "nobody asked"}).encode()
    forged = {
        "format": json.loads(data)["format"],
        "document": forged_document.decode(),
        "signature": other.sign(certificate_signing_message(forged_document)),
        "public_key": other.public_key.pem,
    }
    forged_bytes = json.dumps(forged).encode()
    assert verify_certificate(forged_bytes).ok and not verify_certificate(forged_bytes).origin_verified
    assert not verify_certificate(forged_bytes, key).ok

    # By request id; and what cannot have a certificate.
    assert lethe(["proof", "--request", f.unlearn.id, *f.at]) == 0
    assert json.loads(json.loads(capsys.readouterr().out)["document"])["request"]["job_id"] == f.unlearn.id
    learn = next(j for j in c.jobs() if j.kind == pb.LEARN)
    for call, code in (
        (lambda: c.forgetting_certificate(job_id=learn.id), grpc.StatusCode.FAILED_PRECONDITION),
        (lambda: c.forgetting_certificate(job_id="f" * 32), grpc.StatusCode.NOT_FOUND),
        (lambda: c.forgetting_certificate(task="kept"), grpc.StatusCode.FAILED_PRECONDITION),
        (lambda: c.forgetting_certificate(task="never-seen"), grpc.StatusCode.NOT_FOUND),
        (lambda: c.forgetting_certificate(), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        with pytest.raises(LetheError) as refused:
            call()
        assert refused.value.code == code, refused.value.message


def test_the_audit_key_is_created_private_reused_and_configurable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    data_dir = tmp_path / "data"
    config = make_config(data_dir, url)
    with running_app(config) as running:
        first = running.client.audit_head().public_key
    key_file = data_dir / "keys" / "audit-ed25519.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert (data_dir / "keys" / "audit-ed25519.pub").read_text() == first
    with running_app(config) as running:
        assert running.client.audit_head().public_key == first  # a restart reuses the key
        started = [json.loads(e.details_json) for e in running.client.audit_events() if e.action == "server.started"]
    assert [s["audit_key"] for s in started] == [AuditPublicKey.from_pem(first).fingerprint] * 2

    configured = AuditSigningKey.generate()
    custom = tmp_path / "secrets" / "audit.pem"
    custom.parent.mkdir()
    custom.write_bytes(configured.private_pem())
    other_dir = tmp_path / "other"
    config = make_config(other_dir, f"sqlite:///{tmp_path / 'other.sqlite'}", **{"audit.signing_key_file": str(custom)})
    with running_app(config) as running:
        assert running.client.audit_head().public_key == configured.public_key.pem
    assert not (other_dir / "keys" / "audit-ed25519.pem").exists()
    assert (other_dir / "keys" / "audit-ed25519.pub").read_text() == configured.public_key.pem
    with pytest.raises(ConfigError, match=r"audit\.signing_key_file"):
        make_config(other_dir, url, **{"audit.signing_key_file": str(tmp_path / "missing.pem")})
