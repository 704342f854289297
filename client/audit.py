"""Independent verification of the audit trail a server exports (``ListAuditEvents``).

Uses the same stdlib-only chain code as the server (``protos.audit_chain``), so anyone holding the
exported events can check that none was edited, reordered or removed from the middle. Deleting the
newest events is detected only by the server's own check (``lethe db verify-audit``), which compares
with the stored chain head.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC

from protos import lethe_pb2 as pb
from protos.audit_chain import GENESIS_HASH, canonical_json, chain_hash


def verify_chain(events: Sequence[pb.AuditEvent]) -> str | None:
    """Check a complete, oldest-first export; return None when intact, else what is wrong."""
    previous = GENESIS_HASH
    for expected_seq, event in enumerate(events, start=1):
        if event.seq != expected_seq:
            return f"expected seq {expected_seq}, found {event.seq} (an event was removed or reordered)"
        if event.prev_hash != previous:
            return f"seq {event.seq}: prev_hash does not match the hash of seq {event.seq - 1}"
        try:
            details = json.loads(event.details_json)
        except json.JSONDecodeError:
            return f"seq {event.seq}: details_json is not valid JSON"
        canonical = canonical_json(
            seq=event.seq,
            at=event.at.ToDatetime(tzinfo=UTC),
            principal=event.principal,
            action=event.action,
            task=event.task,
            job_id=event.job_id,
            details=details,
        )
        recomputed = chain_hash(previous, canonical)
        if recomputed != event.hash:
            return f"seq {event.seq}: hash does not match its contents (the event was edited)"
        previous = event.hash
    return None
