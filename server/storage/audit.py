"""The tamper-evident audit log: hash-chained, append-only events.

Every event stores the hash of its predecessor and its own hash (see
:mod:`protos.audit_chain`); the ``audit_head`` row stores the newest seq and hash. Editing
any field of any event, deleting an event anywhere (including the newest ones), or editing the head
makes :meth:`AuditLog.verify` fail. Rewriting the whole chain from some point on, head included, is
not detectable from inside the database: anchor ``audit_head.last_hash`` outside it (logs,
backups) if that matters.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import event, exists, select
from sqlalchemy.orm import Session, sessionmaker

from protos.audit_chain import GENESIS_HASH, canonical_json, chain_hash, encode_details
from server.storage.column_types import utc_now
from server.storage.models import AuditEvent, AuditHead

#: Primary key of the single ``audit_head`` row (inserted by the initial migration).
AUDIT_HEAD_ID = 1


@dataclass(frozen=True)
class AuditVerification:
    """Result of :meth:`AuditLog.verify`.

    Attributes:
        ok: Whether the whole chain and the head are intact.
        checked: Events verified intact (all of them when ``ok``; those before the break otherwise).
        first_bad_seq: The first seq that is edited or missing, ``None`` when ``ok`` (or when only
            the head row itself is missing).
        reason: What was found, in words.
    """

    ok: bool
    checked: int
    first_bad_seq: int | None
    reason: str


#: ``session.info`` key under which :meth:`AuditLog.append` lists the actions of the open transaction.
PENDING_ACTIONS = "lethe_audit_actions"


def on_audit_commit(sessions: sessionmaker[Session], callback: Callable[[str], None]) -> None:
    """Call ``callback(action)`` for every audit event once its transaction has committed."""

    def committed(session: Session) -> None:
        for action in session.info.pop(PENDING_ACTIONS, []):
            callback(action)

    def rolled_back(session: Session) -> None:
        session.info.pop(PENDING_ACTIONS, None)

    event.listen(sessions, "after_commit", committed)
    event.listen(sessions, "after_rollback", rolled_back)


class AuditLog:
    """Appends to and verifies the audit log inside the caller's transaction (never commits).

    Args:
        clock: Source of event timestamps (aware datetimes).
        batch_size: Events read per query while verifying.
    """

    def __init__(self, clock: Callable[[], datetime] = utc_now, batch_size: int = 1000) -> None:
        self.clock = clock
        self.batch_size = batch_size

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
        )
        session.add(event)
        head.last_seq = seq
        head.last_hash = digest
        session.flush()
        # Listeners (metrics) read this after the transaction commits; see audit_actions_committed.
        session.info.setdefault(PENDING_ACTIONS, []).append(action)
        return event

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

    def verify(self, session: Session) -> AuditVerification:
        """Recomputes the whole chain and checks it against the head row.

        Detects an edited field in any event, a missing event (a seq gap or a ``prev_hash`` that
        does not match), deleted newest events (the head is ahead of the log), and an edited head.
        Stops at the first problem. Events appended concurrently while verifying are verified too.

        Args:
            session: The caller's session (read-only use).

        Returns:
            The verification result.
        """
        checked = 0
        last_seq = 0
        last_hash = GENESIS_HASH
        while True:
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
                )
                .where(AuditEvent.seq > last_seq)
                .order_by(AuditEvent.seq)
                .limit(self.batch_size)
            ).all()
            if not batch:
                head = session.scalars(
                    select(AuditHead).where(AuditHead.id == AUDIT_HEAD_ID).execution_options(populate_existing=True)
                ).one_or_none()
                if head is None:
                    return _broken(checked, None, "the audit_head row is missing")
                if head.last_seq > last_seq and session.scalar(select(exists().where(AuditEvent.seq > last_seq))):
                    continue  # appended while we were verifying
                return _check_head(checked, last_seq, last_hash, head)
            for row in batch:
                expected_seq = last_seq + 1
                if row.seq != expected_seq:
                    return _broken(
                        checked, expected_seq, f"event {expected_seq} is missing (the next stored event is {row.seq})"
                    )
                if row.prev_hash != last_hash:
                    return _broken(
                        checked, row.seq, f"event {row.seq}: prev_hash does not match the hash of event {last_seq}"
                    )
                try:
                    details = json.loads(row.details_json)
                except ValueError:
                    details = None
                if not isinstance(details, dict):
                    return _broken(checked, row.seq, f"event {row.seq}: details_json is not a JSON object")
                try:
                    canonical = canonical_json(
                        seq=row.seq,
                        at=row.at,
                        principal=row.principal,
                        action=row.action,
                        task=row.task,
                        job_id=row.job_id,
                        details=details,
                    )
                except ValueError as error:  # e.g. NaN written into details_json by hand
                    return _broken(checked, row.seq, f"event {row.seq}: cannot be serialized canonically ({error})")
                if chain_hash(row.prev_hash, canonical) != row.hash:
                    return _broken(
                        checked, row.seq, f"event {row.seq}: hash mismatch, the event was modified after it was written"
                    )
                last_seq = row.seq
                last_hash = row.hash
                checked += 1


def _broken(checked: int, first_bad_seq: int | None, reason: str) -> AuditVerification:
    return AuditVerification(ok=False, checked=checked, first_bad_seq=first_bad_seq, reason=reason)


def _check_head(checked: int, last_seq: int, last_hash: str, head: AuditHead) -> AuditVerification:
    """Compares the newest stored event with the head row."""
    if head.last_seq > last_seq:
        return _broken(
            checked,
            last_seq + 1,
            f"events {last_seq + 1}..{head.last_seq} are missing: the newest events were deleted "
            f"(audit_head says the last seq is {head.last_seq}, the newest stored event is {last_seq})",
        )
    if head.last_seq < last_seq:
        return _broken(
            checked,
            head.last_seq + 1,
            f"audit_head says the last seq is {head.last_seq} but events up to {last_seq} exist: the head was edited",
        )
    if head.last_hash != last_hash:
        return _broken(
            checked,
            last_seq or None,
            f"audit_head hash does not match the hash of event {last_seq}: the head was edited",
        )
    return AuditVerification(ok=True, checked=checked, first_bad_seq=None, reason=f"{checked} events verified")
