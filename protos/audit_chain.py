"""The audit log's hash chain, in plain Python (stdlib only).

Kept free of SQLAlchemy so anyone holding exported events (``ListAuditEvents``) can recompute the
chain with exactly the code the server used::

    hash_n = sha256((hash_{n-1} + canonical_json(event_n)).encode()).hexdigest()

with ``hash_0 = GENESIS_HASH`` (64 zeros) and ``canonical_json`` the compact, key-sorted JSON of
``seq``, ``at`` (ISO-8601, UTC, microseconds, ``+00:00``), ``principal``, ``action``, ``task``,
``job_id`` and ``details`` (the parsed object, not the stored string).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

#: ``prev_hash`` of the first event, and the head hash of an empty log.
GENESIS_HASH = "0" * 64


def format_timestamp(at: datetime) -> str:
    """Formats ``at`` the way the chain hashes it: ISO-8601 in UTC with microseconds.

    Args:
        at: An aware datetime.

    Returns:
        For example ``"2026-01-02T03:04:05.000006+00:00"``.

    Raises:
        ValueError: If ``at`` is naive.
    """
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"naive datetime {at!r}: audit timestamps must be timezone-aware")
    return at.astimezone(UTC).isoformat(timespec="microseconds")


def encode_details(details: Mapping[str, Any]) -> str:
    """Serializes event details as compact, key-sorted, strict JSON (the stored ``details_json``).

    Raises:
        TypeError: If a value is not JSON-serializable.
        ValueError: If a float is NaN or infinite (not valid JSON).
    """
    return json.dumps(dict(details), sort_keys=True, separators=(",", ":"), allow_nan=False)


def canonical_json(
    *,
    seq: int,
    at: datetime,
    principal: str,
    action: str,
    task: str,
    job_id: str,
    details: Mapping[str, Any],
) -> str:
    """The canonical serialization of one event that the chain hashes.

    Args:
        seq: Position in the log, starting at 1.
        at: When the event was recorded (aware).
        principal: Who caused it.
        action: What happened, e.g. ``"learn.queued"``.
        task: The task concerned, ``""`` if none.
        job_id: The job concerned, ``""`` if none.
        details: The parsed ``details_json`` object.

    Returns:
        Compact JSON with sorted keys.
    """
    row = {
        "seq": seq,
        "at": format_timestamp(at),
        "principal": principal,
        "action": action,
        "task": task,
        "job_id": job_id,
        "details": dict(details),
    }
    return json.dumps(row, sort_keys=True, separators=(",", ":"), allow_nan=False)


def chain_hash(prev_hash: str, canonical: str) -> str:
    """Returns ``sha256(prev_hash + canonical)`` as 64 lowercase hex digits."""
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()
