"""The audit log's hash chain, in plain Python (stdlib only).

Kept free of SQLAlchemy so anyone holding exported events (``ListAuditEvents``) can recompute the
chain with exactly the code the server used::

    hash_n = sha256((hash_{n-1} + canonical_json(event_n)).encode()).hexdigest()

with ``hash_0 = GENESIS_HASH`` (64 zeros) and ``canonical_json`` the compact, key-sorted JSON of
``seq``, ``at`` (ISO-8601, UTC, microseconds, ``+00:00``), ``principal``, ``action``, ``task``,
``job_id`` and ``details`` (the parsed object, not the stored string).

The chain is keyed by the server's Ed25519 audit key (:mod:`protos.audit_signing`): each event's
``signature`` signs ``lethe-audit-event:<hash>``, the head's signs ``lethe-audit-head:<seq>:<hash>``.
Without the key, anyone who can write the database can rewrite a suffix and recompute every hash;
with the public key, :class:`ChainVerifier` names the first rewritten event. The messages are built
here and the signatures checked through a callable, so this module stays stdlib-only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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


# --------------------------------------------------------------------------- signatures
#: Prefixes that separate what the audit key signs, so no signature can be replayed as another kind.
EVENT_SIGNING_PREFIX = "lethe-audit-event:"
HEAD_SIGNING_PREFIX = "lethe-audit-head:"
CERTIFICATE_SIGNING_PREFIX = "lethe-forgetting-certificate:"

#: ``check(message, signature_hex) -> bool``: verifies an Ed25519 signature with a public key.
SignatureCheck = Callable[[bytes, str], bool]


def event_signing_message(event_hash: str) -> bytes:
    """What the audit key signs for one event: ``lethe-audit-event:<hash>`` (the hash commits to the rest)."""
    return f"{EVENT_SIGNING_PREFIX}{event_hash}".encode()


def head_signing_message(seq: int, head_hash: str) -> bytes:
    """What the audit key signs for the chain head: ``lethe-audit-head:<seq>:<hash>``."""
    return f"{HEAD_SIGNING_PREFIX}{seq}:{head_hash}".encode()


def certificate_signing_message(document: bytes) -> bytes:
    """What the audit key signs for a forgetting certificate: the prefix, then the document's bytes."""
    return CERTIFICATE_SIGNING_PREFIX.encode() + document


@dataclass(frozen=True)
class ChainHead:
    """The newest event of a chain as a head names it: ``seq``, its ``hash``, and the head signature."""

    seq: int
    hash: str
    signature: str = ""


@dataclass(frozen=True)
class ChainReport:
    """What a :class:`ChainVerifier` found.

    Attributes:
        ok: Whether every event (and every head given) checked out.
        checked: Events verified intact (those before the first problem).
        first_bad_seq: The first event that is edited, missing, unsigned or wrongly signed; ``None``
            when ``ok`` (or when only a head is wrong and no event can be named).
        reason: What was found, in words.
        unsigned: Events accepted without a signature: the prefix written before signing existed.
        signatures_checked: Whether a public key was given (without one a rewritten suffix whose
            hashes were all recomputed is not detectable).
    """

    ok: bool
    checked: int
    first_bad_seq: int | None
    reason: str
    unsigned: int = 0
    signatures_checked: bool = False


class ChainVerifier:
    """Checks a chain's events oldest first, one at a time, then its head; stops at the first problem.

    The same rules on the server (:meth:`server.storage.AuditLog.verify`) and in the client
    (:mod:`client.audit`):

    * seqs run 1, 2, 3 ... without gaps, each ``prev_hash`` is the previous event's ``hash``, and each
      ``hash`` is recomputed from the event's fields;
    * with ``check_signature`` (a public key): a signed event's signature must verify; an event
      without one is accepted only before the first signed event (written before signing existed);
      a head must be signed (unless nothing in the chain is) and its signature must verify;
    * ``published``: a head published outside the database (the head file, ``GetAuditHead``, the
      ``lethe_audit_head`` metric). The chain must contain its seq with its hash; more events after it
      are fine (appended since), fewer mean the newest events were deleted.

    Args:
        check_signature: Verifies a signature with the trusted public key; ``None`` checks hashes only.
        published: A head published outside the database, checked while the events stream past.
    """

    def __init__(self, check_signature: SignatureCheck | None = None, published: ChainHead | None = None) -> None:
        self.check_signature = check_signature
        self.published = published
        self.last_seq = 0
        self.last_hash = GENESIS_HASH
        self.checked = 0
        self.unsigned = 0
        self.signed_seen = False
        self.problem: tuple[int | None, str] | None = None
        if published is not None and check_signature is not None:
            self._check_head_signature(published, "the published head")

    @property
    def broken(self) -> bool:
        """Whether a problem was found (nothing more is checked)."""
        return self.problem is not None

    def _fail(self, seq: int | None, reason: str) -> bool:
        if self.problem is None:
            self.problem = (seq, reason)
        return False

    def add(
        self,
        *,
        seq: int,
        at: datetime,
        principal: str,
        action: str,
        task: str,
        job_id: str,
        details_json: str,
        prev_hash: str,
        hash: str,
        signature: str = "",
    ) -> bool:
        """Checks the next event; returns whether the chain is still intact."""
        if self.problem is not None:
            return False
        expected = self.last_seq + 1
        if seq != expected:
            return self._fail(expected, f"event {expected} is missing (the next stored event is {seq})")
        if prev_hash != self.last_hash:
            return self._fail(seq, f"event {seq}: prev_hash does not match the hash of event {self.last_seq}")
        try:
            details = json.loads(details_json)
        except ValueError:
            details = None
        if not isinstance(details, dict):
            return self._fail(seq, f"event {seq}: details_json is not a JSON object")
        try:
            canonical = canonical_json(
                seq=seq, at=at, principal=principal, action=action, task=task, job_id=job_id, details=details
            )
        except ValueError as error:  # e.g. NaN written into details_json by hand
            return self._fail(seq, f"event {seq}: cannot be serialized canonically ({error})")
        if chain_hash(prev_hash, canonical) != hash:
            return self._fail(seq, f"event {seq}: hash mismatch, the event was modified after it was written")
        if self.check_signature is not None:
            if signature:
                if not self.check_signature(event_signing_message(hash), signature):
                    return self._fail(
                        seq,
                        f"event {seq}: its signature does not verify with the public key: the event was "
                        "rewritten (its hashes recomputed), or it was signed by another key",
                    )
                self.signed_seen = True
            elif self.signed_seen:
                return self._fail(
                    seq,
                    f"event {seq} is unsigned after signed events: its signature was removed, the event was "
                    "rewritten or inserted",
                )
            else:
                self.unsigned += 1
        if self.published is not None and seq == self.published.seq and hash != self.published.hash:
            return self._fail(
                seq,
                f"event {seq}: its hash differs from the head published outside the database "
                f"({self.published.hash[:16]}…): the event was rewritten",
            )
        self.last_seq, self.last_hash = seq, hash
        self.checked += 1
        return True

    def _check_head_signature(self, head: ChainHead, name: str) -> bool:
        assert self.check_signature is not None
        if not head.signature:
            if head.seq == 0:
                return True
            return self._fail(None, f"{name} (seq {head.seq}) is not signed")
        if not self.check_signature(head_signing_message(head.seq, head.hash), head.signature):
            return self._fail(None, f"{name} (seq {head.seq}): its signature does not verify with the public key")
        return True

    def finish(self, stored: ChainHead | None = None) -> ChainReport:
        """Checks the end of the chain against the heads; returns the report.

        Args:
            stored: The head stored next to the events (the database's ``audit_head`` row): it must
                name exactly the newest event.
        """
        if self.problem is None and stored is not None:
            self._check_stored_head(stored)
        if self.problem is None and self.published is not None and self.published.seq > self.last_seq:
            self._fail(
                self.last_seq + 1,
                f"events {self.last_seq + 1}..{self.published.seq} are missing: the newest events were deleted "
                f"(the head published outside the database is seq {self.published.seq}, the newest stored "
                f"event is {self.last_seq})",
            )
        if self.problem is not None:
            seq, reason = self.problem
            return ChainReport(False, self.checked, seq, reason, self.unsigned, self.check_signature is not None)
        reason = f"{self.checked} events verified"
        if self.check_signature is not None:
            if self.unsigned:
                reason += f" ({self.unsigned} unsigned, written before signing existed; the rest signed)"
            else:
                reason += " (all signed)"
        return ChainReport(True, self.checked, None, reason, self.unsigned, self.check_signature is not None)

    def _check_stored_head(self, head: ChainHead) -> None:
        last_seq, last_hash = self.last_seq, self.last_hash
        if head.seq > last_seq:
            self._fail(
                last_seq + 1,
                f"events {last_seq + 1}..{head.seq} are missing: the newest events were deleted "
                f"(audit_head says the last seq is {head.seq}, the newest stored event is {last_seq})",
            )
        elif head.seq < last_seq:
            self._fail(
                head.seq + 1,
                f"audit_head says the last seq is {head.seq} but events up to {last_seq} exist: the head was edited",
            )
        elif head.hash != last_hash:
            self._fail(
                last_seq or None, f"audit_head hash does not match the hash of event {last_seq}: the head was edited"
            )
        elif self.check_signature is not None and (self.signed_seen or head.signature):
            self._check_head_signature(head, "audit_head")
