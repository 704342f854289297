"""What someone with write access to the database can do to the audit log, done the way they would."""

from __future__ import annotations

import json

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from server.storage import AUDIT_HEAD_ID, AuditEvent, AuditHead, canonical_json, chain_hash


def rewrite_audit_suffix(engine: Engine, first: int, *, strip_signatures: bool = False) -> None:
    """Edit event ``first``'s details, then recompute every hash and ``prev_hash`` after it and the stored head.

    The unkeyed chain stays consistent: only the signatures (which need the server's private key)
    give the rewrite away, or their absence when ``strip_signatures``.
    """
    with Session(engine) as session, session.begin():
        rows = session.scalars(select(AuditEvent).where(AuditEvent.seq >= first).order_by(AuditEvent.seq)).all()
        previous = rows[0].prev_hash
        for row in rows:
            details = row.details
            if row.seq == first:
                details["rewritten"] = "by a database administrator"
            canonical = canonical_json(
                seq=row.seq,
                at=row.at,
                principal=row.principal,
                action=row.action,
                task=row.task,
                job_id=row.job_id,
                details=details,
            )
            row.details_json = json.dumps(details, sort_keys=True, separators=(",", ":"))
            row.prev_hash, row.hash = previous, chain_hash(previous, canonical)
            if strip_signatures:
                row.signature = ""
            previous = row.hash
        head = session.get(AuditHead, AUDIT_HEAD_ID)
        assert head is not None
        head.last_seq, head.last_hash = rows[-1].seq, previous
