"""The tamper-evident audit log: hash-chained, signed, append-only events.

Every event stores the hash of its predecessor and its own hash (see
:mod:`protos.audit_chain`); the ``audit_head`` row stores the newest seq and hash. Editing
any field of any event, deleting an event anywhere (including the newest ones), or editing the head
makes :meth:`AuditLog.verify` fail.

Hashes alone do not stop someone who can write the database: they can rewrite the chain from some
point on and recompute every hash and the head. So an :class:`AuditLog` built with a signer (the
server's Ed25519 audit key) also signs each event's hash and the head; :meth:`AuditLog.verify` with
the public key names the first rewritten event, and a head published outside the database (see
:func:`on_audit_head_commit`) shows deletions of the newest events. Events written before signing
existed (empty signature) are accepted only as a prefix.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import event, exists, select
from sqlalchemy.orm import Session, sessionmaker

from protos.audit_chain import (
    ChainHead,
    ChainReport,
    ChainVerifier,
    canonical_json,
    chain_hash,
    encode_details,
    event_signing_message,
    head_signing_message,
)
from server.storage.column_types import utc_now
from server.storage.models import AuditEvent, AuditHead

if TYPE_CHECKING:
    from protos.audit_signing import AuditPublicKey

#: Primary key of the single ``audit_head`` row (inserted by the initial migration).
AUDIT_HEAD_ID = 1


class AuditSigner(Protocol):
    """Signs audit messages (:class:`protos.audit_signing.AuditSigningKey` is one)."""

    def sign(self, message: bytes) -> str:
        """The signature of ``message`` as lowercase hex."""
        ...


@dataclass(frozen=True)
class AuditVerification:
    """Result of :meth:`AuditLog.verify`.

    Attributes:
        ok: Whether the whole chain and the head are intact.
        checked: Events verified intact (all of them when ``ok``; those before the break otherwise).
        first_bad_seq: The first seq that is edited or missing, ``None`` when ``ok`` (or when only
            the head row itself is missing).
        reason: What was found, in words.
        unsigned: Events accepted without a signature (the prefix from before signing existed);
            counted only when a public key was given.
    """

    ok: bool
    checked: int
    first_bad_seq: int | None
    reason: str
    unsigned: int = 0


#: ``session.info`` key under which :meth:`AuditLog.append` lists the actions of the open transaction.
PENDING_ACTIONS = "lethe_audit_actions"
#: ``session.info`` key of the newest head the open transaction appended.
PENDING_HEAD = "lethe_audit_head"


def on_audit_commit(sessions: sessionmaker[Session], callback: Callable[[str], None]) -> None:
    """Call ``callback(action)`` for every audit event once its transaction has committed."""

    def committed(session: Session) -> None:
        for action in session.info.pop(PENDING_ACTIONS, []):
            callback(action)

    def rolled_back(session: Session) -> None:
        session.info.pop(PENDING_ACTIONS, None)

    event.listen(sessions, "after_commit", committed)
    event.listen(sessions, "after_rollback", rolled_back)


def on_audit_head_commit(sessions: sessionmaker[Session], callback: Callable[[ChainHead], None]) -> None:
    """Call ``callback(head)`` with the newest head of every transaction that appended, once committed.

    Commits of concurrent transactions may reach their callbacks in either order: the callback keeps
    the head with the highest seq (see :class:`server.audit_head.AuditHeadPublisher`).
    """

    def committed(session: Session) -> None:
        head = session.info.pop(PENDING_HEAD, None)
        if head is not None:
            callback(head)

    def rolled_back(session: Session) -> None:
        session.info.pop(PENDING_HEAD, None)

    event.listen(sessions, "after_commit", committed)
    event.listen(sessions, "after_rollback", rolled_back)


class AuditLog:
    """Appends to and verifies the audit log inside the caller's transaction (never commits).

    Args:
        clock: Source of event timestamps (aware datetimes).
        batch_size: Events read per query while verifying.
        signer: The server's audit key: signs every event and the head. Without one (tests, tools)
            events and head get empty signatures, which a verification with a public key accepts
            only before the first signed event.
    """

    def __init__(
        self, clock: Callable[[], datetime] = utc_now, batch_size: int = 1000, signer: AuditSigner | None = None
    ) -> None:
        self.clock = clock
        self.batch_size = batch_size
        self.signer = signer

    def append(
        self,
        session: Session,
        *,
        principal: str,
        action: str,
        task: str = "",
        job_id: str = "",
        details: Mapping[str, Any] | None = None,
    ) -> AuditEvent:
        """Appends one event (flushed) and advances the head, in the caller's transaction.

        Concurrent appends are serialized by the ``audit_head`` row lock (PostgreSQL
        ``SELECT ... FOR UPDATE``; on SQLite every transaction already holds the write lock), so seqs
        are gap-free and each event chains onto the one committed before it. The lock is held until
        the caller's transaction ends: keep appending transactions short.

        Args:
            session: The caller's session.
            principal: Who caused the event.
            action: What happened, e.g. ``"learn.queued"``.
            task: The task concerned, ``""`` if none.
            job_id: The job concerned, ``""`` if none.
            details: JSON-serializable object with finite floats.

        Returns:
            The new event.

        Raises:
            ValueError: If ``action`` is empty or ``details`` holds NaN/infinity.
            TypeError: If ``details`` is not JSON-serializable.
            RuntimeError: If the ``audit_head`` row is missing (database not migrated).
        """
        if not action:
            raise ValueError("audit action must not be empty")
        details_json = encode_details(details or {})
        head = session.scalars(
            select(AuditHead)
            .where(AuditHead.id == AUDIT_HEAD_ID)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).one_or_none()
        if head is None:
            raise RuntimeError("the audit_head row is missing: is the database migrated (lethe db upgrade)?")
        # Read the clock under the lock so timestamps never go backwards along the chain.
        at = self.clock()
        seq = head.last_seq + 1
        canonical = canonical_json(
            seq=seq,
            at=at,
            principal=principal,
            action=action,
            task=task,
            job_id=job_id,
            details=json.loads(details_json),
        )
        digest = chain_hash(head.last_hash, canonical)
        signature = self.signer.sign(event_signing_message(digest)) if self.signer else ""
        event = AuditEvent(
            seq=seq,
            at=at,
            principal=principal,
            action=action,
            task=task,
            job_id=job_id,
            details_json=details_json,
            prev_hash=head.last_hash,
            hash=digest,
            signature=signature,
        )
        session.add(event)
        head.last_seq = seq
        head.last_hash = digest
        head.signature = self.signer.sign(head_signing_message(seq, digest)) if self.signer else ""
        session.flush()
        # Listeners (metrics, the published head) read these after the transaction commits.
        session.info.setdefault(PENDING_ACTIONS, []).append(action)
        session.info[PENDING_HEAD] = ChainHead(seq, digest, head.signature)
        return event

    @staticmethod
    def head(session: Session) -> ChainHead:
        """The stored head (seq, hash and signature of the newest event), as committed.

        Raises:
            RuntimeError: If the ``audit_head`` row is missing (database not migrated).
        """
        head = session.scalars(
            select(AuditHead).where(AuditHead.id == AUDIT_HEAD_ID).execution_options(populate_existing=True)
        ).one_or_none()
        if head is None:
            raise RuntimeError("the audit_head row is missing: is the database migrated (lethe db upgrade)?")
        return ChainHead(head.last_seq, head.last_hash, head.signature)

    def list(
        self, session: Session, after_seq: int = 0, limit: int = 100, task: str | None = None
    ) -> builtins.list[AuditEvent]:
        """Returns events in log order, paged.

        Args:
            session: The caller's session.
            after_seq: Only events with ``seq`` greater than this (the paging cursor).
            limit: At most this many events (at least 1).
            task: Only events concerning this task.

        Raises:
            ValueError: If ``limit`` is less than 1.
        """
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        statement = select(AuditEvent).where(AuditEvent.seq > after_seq).order_by(AuditEvent.seq).limit(limit)
        if task is not None:
            statement = statement.where(AuditEvent.task == task)
        return builtins.list(session.scalars(statement))

    def verify(
        self, session: Session, public_key: AuditPublicKey | None = None, published: ChainHead | None = None
    ) -> AuditVerification:
        """Recomputes the whole chain and checks it against the head row (and signatures, given a key).

        Detects an edited field in any event, a missing event (a seq gap or a ``prev_hash`` that
        does not match), deleted newest events (the head is ahead of the log), and an edited head.
        With ``public_key`` it also detects a rewritten suffix whose hashes and head were all
        recomputed (the first event whose signature fails, or that lost its signature, is named);
        with ``published`` (a head kept outside the database) also the deletion of the newest events
        together with the head row. Stops at the first problem. Events appended concurrently while
        verifying are verified too.

        Args:
            session: The caller's session (read-only use).
            public_key: The server's audit public key; ``None`` checks the hash chain only.
            published: A head published outside the database (the head file), if one is trusted.

        Returns:
            The verification result.
        """
        checker = ChainVerifier(public_key.verify if public_key is not None else None, published)
        while not checker.broken:
            batch = session.execute(
                select(
                    AuditEvent.seq,
                    AuditEvent.at,
                    AuditEvent.principal,
                    AuditEvent.action,
                    AuditEvent.task,
                    AuditEvent.job_id,
                    AuditEvent.details_json,
                    AuditEvent.prev_hash,
                    AuditEvent.hash,
                    AuditEvent.signature,
                )
                .where(AuditEvent.seq > checker.last_seq)
                .order_by(AuditEvent.seq)
                .limit(self.batch_size)
            ).all()
            if not batch:
                head = session.scalars(
                    select(AuditHead).where(AuditHead.id == AUDIT_HEAD_ID).execution_options(populate_existing=True)
                ).one_or_none()
                if head is None:
                    return _broken(checker.checked, None, "the audit_head row is missing")
                if head.last_seq > checker.last_seq and session.scalar(
                    select(exists().where(AuditEvent.seq > checker.last_seq))
                ):
                    continue  # appended while we were verifying
                return _verification(checker.finish(ChainHead(head.last_seq, head.last_hash, head.signature)))
            for row in batch:
                if not checker.add(**row._asdict()):
                    break
        return _verification(checker.finish())


def _verification(report: ChainReport) -> AuditVerification:
    return AuditVerification(report.ok, report.checked, report.first_bad_seq, report.reason, report.unsigned)


def _broken(checked: int, first_bad_seq: int | None, reason: str) -> AuditVerification:
    return AuditVerification(ok=False, checked=checked, first_bad_seq=first_bad_seq, reason=reason)
