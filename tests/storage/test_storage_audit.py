"""The audit log: hash chain, tamper detection, concurrent appends."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from protos.audit_chain import ChainHead, event_signing_message, head_signing_message
from protos.audit_signing import AuditSigningKey
from server.storage import GENESIS_HASH, AuditEvent, AuditLog, AuditVerification
from tests.tampering import rewrite_audit_suffix

#: For behaviour decided in Python before any SQL runs: one backend is enough.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def _append_many(session_factory: sessionmaker[Session], count: int, log: AuditLog | None = None) -> None:
    log = log or AuditLog()
    with session_factory.begin() as session:
        for index in range(count):
            log.append(
                session,
                principal="alice",
                action="learn.queued" if index % 2 else "unlearn.done",
                task=f"task-{index % 4}",
                job_id=f"{index:032x}",
                details={"index": index, "files": [{"path": f"spool/{index}.bin", "bytes": 10 * index}], "ratio": 0.5},
            )


def _verify(session_factory: sessionmaker[Session]) -> AuditVerification:
    with session_factory() as session:
        return AuditLog().verify(session)


def _tamper(engine: Engine, statement: str, **parameters: object) -> None:
    with engine.begin() as connection:
        assert connection.execute(text(statement), parameters).rowcount == 1


def test_an_empty_log_verifies(session_factory: sessionmaker[Session]) -> None:
    assert _verify(session_factory) == AuditVerification(
        ok=True, checked=0, first_bad_seq=None, reason="0 events verified"
    )


def test_chain_follows_the_documented_formula(session_factory: sessionmaker[Session]) -> None:
    at = datetime(2026, 5, 6, 7, 8, 9, 10, tzinfo=timezone(timedelta(hours=-4)))
    with session_factory.begin() as session:
        log = AuditLog(clock=lambda: at)
        first = log.append(session, principal="bob", action="learn.queued", task="t", details={"b": 1, "a": [1.5]})
        second = log.append(session, principal="bob", action="audit.read")
    canonical = json.dumps(
        {
            "seq": 1,
            "at": "2026-05-06T11:08:09.000010+00:00",
            "principal": "bob",
            "action": "learn.queued",
            "task": "t",
            "job_id": "",
            "details": {"a": [1.5], "b": 1},
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    assert first.prev_hash == GENESIS_HASH
    assert first.hash == hashlib.sha256((GENESIS_HASH + canonical).encode()).hexdigest()
    assert second.seq == 2 and second.prev_hash == first.hash
    assert first.details_json == '{"a":[1.5],"b":1}'
    with session_factory() as session:
        stored = session.get(AuditEvent, 1)
        assert stored is not None and stored.at == at and stored.details == {"a": [1.5], "b": 1}


def test_many_appends_verify(session_factory: sessionmaker[Session]) -> None:
    _append_many(session_factory, 120)
    _append_many(session_factory, 30)
    result = _verify(session_factory)
    assert result == AuditVerification(ok=True, checked=150, first_bad_seq=None, reason="150 events verified")
    with session_factory() as session:
        log = AuditLog()
        assert [event.seq for event in log.list(session, after_seq=145)] == [146, 147, 148, 149, 150]
        assert [event.seq for event in log.list(session, after_seq=10, limit=3, task="task-1")] == [14, 18, 22]


@SQLITE_ONLY
def test_verify_reads_in_batches(session_factory: sessionmaker[Session]) -> None:
    _append_many(session_factory, 25)
    with session_factory() as session:
        assert AuditLog(batch_size=7).verify(session).checked == 25


def test_verify_catches_an_edited_details_field(session_factory: sessionmaker[Session], db_engine: Engine) -> None:
    _append_many(session_factory, 20)
    # Only the "ratio" inside details changes; everything else, hashes included, is left as stored.
    with session_factory() as session:
        stored = session.get(AuditEvent, 8)
        assert stored is not None
        edited = {**stored.details, "ratio": 0.25}
    _tamper(db_engine, "UPDATE audit_events SET details_json = :details WHERE seq = 8", details=json.dumps(edited))
    result = _verify(session_factory)
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 8, 7)
    assert "modified" in result.reason


def test_verify_catches_an_edited_principal(session_factory: sessionmaker[Session], db_engine: Engine) -> None:
    _append_many(session_factory, 20)
    _tamper(db_engine, "UPDATE audit_events SET principal = 'mallory' WHERE seq = 1")
    assert (_verify(session_factory).ok, _verify(session_factory).first_bad_seq) == (False, 1)


def test_verify_catches_a_deleted_middle_row(session_factory: sessionmaker[Session], db_engine: Engine) -> None:
    _append_many(session_factory, 20)
    _tamper(db_engine, "DELETE FROM audit_events WHERE seq = 10")
    result = _verify(session_factory)
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 10, 9)
    assert "missing" in result.reason


def test_verify_catches_a_deleted_and_renumbered_middle_row(
    session_factory: sessionmaker[Session], db_engine: Engine
) -> None:
    # Closing the seq gap is not enough: the next event's prev_hash names the deleted one.
    _append_many(session_factory, 5)
    _tamper(db_engine, "DELETE FROM audit_events WHERE seq = 3")
    _tamper(db_engine, "UPDATE audit_events SET seq = 3 WHERE seq = 4")
    _tamper(db_engine, "UPDATE audit_events SET seq = 4 WHERE seq = 5")
    _tamper(db_engine, "UPDATE audit_head SET last_seq = 4")
    result = _verify(session_factory)
    assert (result.ok, result.first_bad_seq) == (False, 3)


def test_verify_catches_a_deleted_last_row(session_factory: sessionmaker[Session], db_engine: Engine) -> None:
    _append_many(session_factory, 20)
    _tamper(db_engine, "DELETE FROM audit_events WHERE seq = 20")
    result = _verify(session_factory)
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 20, 19)
    assert "newest events were deleted" in result.reason


def test_verify_catches_an_edited_hash(session_factory: sessionmaker[Session], db_engine: Engine) -> None:
    _append_many(session_factory, 20)
    _tamper(db_engine, f"UPDATE audit_events SET hash = '{'f' * 64}' WHERE seq = 12")
    result = _verify(session_factory)
    assert (result.ok, result.first_bad_seq) == (False, 12)


def test_verify_catches_an_edited_last_hash(session_factory: sessionmaker[Session], db_engine: Engine) -> None:
    _append_many(session_factory, 5)
    _tamper(db_engine, f"UPDATE audit_events SET hash = '{'f' * 64}' WHERE seq = 5")
    assert (_verify(session_factory).ok, _verify(session_factory).first_bad_seq) == (False, 5)


@pytest.mark.parametrize(
    ("statement", "first_bad_seq"),
    [
        (f"UPDATE audit_head SET last_hash = '{'e' * 64}'", 5),
        ("UPDATE audit_head SET last_seq = 3", 4),
        ("UPDATE audit_head SET last_seq = 9", 6),
    ],
)
def test_verify_catches_an_edited_head(
    session_factory: sessionmaker[Session], db_engine: Engine, statement: str, first_bad_seq: int
) -> None:
    _append_many(session_factory, 5)
    _tamper(db_engine, statement)
    result = _verify(session_factory)
    assert (result.ok, result.first_bad_seq) == (False, first_bad_seq)


def test_appends_continue_the_chain_after_rollback(session_factory: sessionmaker[Session]) -> None:
    _append_many(session_factory, 3)
    with session_factory() as session:
        with session.begin():
            AuditLog().append(session, principal="p", action="will.rollback")
            session.rollback()
        with session.begin():
            event = AuditLog().append(session, principal="p", action="kept")
    assert event.seq == 4
    assert _verify(session_factory).ok


@SQLITE_ONLY
def test_details_must_be_strict_json(session_factory: sessionmaker[Session]) -> None:
    with session_factory() as session:
        with pytest.raises(ValueError):
            AuditLog().append(session, principal="p", action="a", details={"relapse": float("nan")})
        with pytest.raises(TypeError):
            AuditLog().append(session, principal="p", action="a", details={"when": datetime.now(UTC)})
        with pytest.raises(ValueError, match="action"):
            AuditLog().append(session, principal="p", action="")


def test_concurrent_appends_form_one_valid_chain(session_factory: sessionmaker[Session]) -> None:
    threads_count, per_thread = 8, 25
    barrier = threading.Barrier(threads_count)
    errors: list[BaseException] = []

    def append(thread: int) -> None:
        try:
            log = AuditLog()
            with session_factory() as session:
                barrier.wait()
                for index in range(per_thread):
                    with session.begin():
                        log.append(session, principal=f"thread-{thread}", action="concurrent", details={"index": index})
        except BaseException as error:  # collected and re-raised in the test thread
            errors.append(error)

    threads = [threading.Thread(target=append, args=(thread,)) for thread in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []

    total = threads_count * per_thread
    assert _verify(session_factory) == AuditVerification(
        ok=True, checked=total, first_bad_seq=None, reason=f"{total} events verified"
    )
    with session_factory() as session:
        rows = session.execute(select(AuditEvent.seq, AuditEvent.principal, AuditEvent.at)).all()
    assert sorted(seq for seq, _, _ in rows) == list(range(1, total + 1))
    assert Counter(principal for _, principal, _ in rows) == {f"thread-{n}": per_thread for n in range(threads_count)}
    times = [at for _, _, at in sorted(rows)]
    assert times == sorted(times)  # the clock is read under the head lock


# --------------------------------------------------------------------------- the keyed chain
def _verify_with(
    session_factory: sessionmaker[Session], key: AuditSigningKey | None, published: ChainHead | None = None
) -> AuditVerification:
    with session_factory() as session:
        return AuditLog().verify(session, public_key=key.public_key if key else None, published=published)


def test_a_signed_chain_verifies_with_its_public_key(session_factory: sessionmaker[Session]) -> None:
    key = AuditSigningKey.generate()
    _append_many(session_factory, 12, AuditLog(signer=key, batch_size=5))
    result = _verify_with(session_factory, key)
    assert result == AuditVerification(True, 12, None, "12 events verified (all signed)", 0)
    with session_factory() as session:
        head = AuditLog.head(session)
        assert key.public_key.verify(head_signing_message(head.seq, head.hash), head.signature)
        stored = session.get(AuditEvent, 12)
        assert stored is not None and key.public_key.verify(event_signing_message(stored.hash), stored.signature)
    other = AuditSigningKey.generate()
    assert (_verify_with(session_factory, other).ok, _verify_with(session_factory, other).first_bad_seq) == (False, 1)


@pytest.mark.parametrize("strip", [False, True], ids=["signatures-kept", "signatures-removed"])
def test_a_rewritten_suffix_passes_the_hashes_but_not_the_key(
    session_factory: sessionmaker[Session], db_engine: Engine, strip: bool
) -> None:
    key = AuditSigningKey.generate()
    _append_many(session_factory, 10, AuditLog(signer=key))
    rewrite_audit_suffix(db_engine, 8, strip_signatures=strip)
    assert _verify_with(session_factory, None).ok  # the attack is real: the hash chain and head agree
    result = _verify_with(session_factory, key)
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 8, 7)
    assert ("unsigned after signed" if strip else "signature does not verify") in result.reason


def test_unsigned_events_are_accepted_only_as_a_prefix(
    session_factory: sessionmaker[Session], db_engine: Engine
) -> None:
    key = AuditSigningKey.generate()
    _append_many(session_factory, 4)  # before signing existed
    _append_many(session_factory, 3, AuditLog(signer=key))
    result = _verify_with(session_factory, key)
    assert (result.ok, result.unsigned) == (True, 4) and "4 unsigned" in result.reason
    _append_many(session_factory, 1)  # an unsigned event after signed ones: inserted by someone without the key
    assert (_verify_with(session_factory, key).ok, _verify_with(session_factory, key).first_bad_seq) == (False, 8)


def test_an_unsigned_head_over_signed_events_fails(session_factory: sessionmaker[Session], db_engine: Engine) -> None:
    key = AuditSigningKey.generate()
    _append_many(session_factory, 3, AuditLog(signer=key))
    _tamper(db_engine, "UPDATE audit_head SET signature = ''")
    result = _verify_with(session_factory, key)
    assert not result.ok and "audit_head" in result.reason and "not signed" in result.reason


def test_deleting_the_newest_events_and_the_head_is_caught_by_the_published_head(
    session_factory: sessionmaker[Session], db_engine: Engine
) -> None:
    key = AuditSigningKey.generate()
    log = AuditLog(signer=key)
    _append_many(session_factory, 4, log)
    with session_factory() as session:
        old_head = AuditLog.head(session)  # a validly signed head from the past (an old head file, a scrape)
    _append_many(session_factory, 2, log)
    with session_factory() as session:
        published = AuditLog.head(session)
    with db_engine.begin() as connection:  # the newest events go, and the head is put back to the old one
        connection.execute(text("DELETE FROM audit_events WHERE seq > 4"))
        connection.execute(
            text("UPDATE audit_head SET last_seq = :seq, last_hash = :hash, signature = :signature"),
            {"seq": old_head.seq, "hash": old_head.hash, "signature": old_head.signature},
        )
    assert _verify_with(session_factory, key).ok  # chain, signatures and stored head all agree
    result = _verify_with(session_factory, key, published)
    assert (result.ok, result.first_bad_seq) == (False, 5) and "newest events were deleted" in result.reason
