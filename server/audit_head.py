"""The signed audit head, published outside the database after every committed append.

Signing every event stops a rewrite of the chain, but not the deletion of its newest events
together with the head row: what is gone leaves no bad signature behind. So the head (seq, hash,
signature) also lives where a database administrator cannot reach it:

* ``<data_dir>/audit-head.json``, rewritten atomically after every commit that appended
  (``{"seq", "hash", "signature", "public_key_fingerprint"}``);
* the ``lethe_audit_head`` metric (scraped and kept by Prometheus);
* ``GetAuditHead``, from this process's memory.

At start-up the head file of the previous run is compared with the database
(:func:`compare_with_database`): a database that lost or changed events since is reported.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from protos.audit_chain import ChainHead, head_signing_message
from protos.audit_signing import AuditPublicKey
from server.data import write_atomic
from server.storage import AuditEvent, AuditLog
from server.telemetry import Telemetry

log = logging.getLogger(__name__)

#: The head file, relative to the data directory.
HEAD_FILE = "audit-head.json"


def head_document(head: ChainHead, key: AuditPublicKey) -> dict[str, object]:
    """The head file's content."""
    return {"seq": head.seq, "hash": head.hash, "signature": head.signature, "public_key_fingerprint": key.fingerprint}


@dataclass(frozen=True)
class HeadFile:
    """A head file as read back."""

    head: ChainHead
    fingerprint: str


def read_head_file(path: Path) -> HeadFile:
    """Parse a head file.

    Raises:
        FileNotFoundError: There is none.
        ValueError: It is not a head file.
    """
    try:
        data = json.loads(path.read_text())
        head = ChainHead(int(data["seq"]), str(data["hash"]), str(data["signature"]))
        return HeadFile(head, str(data["public_key_fingerprint"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not an audit head file ({error})") from None


class AuditHeadPublisher:
    """Keeps the newest committed head in memory, in the head file and in ``lethe_audit_head``.

    Args:
        path: The head file.
        key: The audit public key (its fingerprint goes with the head).
        telemetry: Where ``lethe_audit_head`` lives.
        initial: The head stored in the database at start-up.
    """

    def __init__(self, path: Path, key: AuditPublicKey, telemetry: Telemetry, initial: ChainHead) -> None:
        self.path = path
        self.key = key
        self.telemetry = telemetry
        self._lock = threading.Lock()
        self._head = initial
        telemetry.record_audit_head(initial.seq, initial.hash, initial.signature, key.fingerprint)

    @property
    def current(self) -> ChainHead:
        """The newest head committed by this process (or found in the database at start-up)."""
        with self._lock:
            return self._head

    def publish(self, head: ChainHead) -> None:
        """After a commit: keep ``head`` if it is the newest seen, and publish it. Never raises.

        Commits of concurrent transactions may arrive in either order; the highest seq wins.
        """
        try:
            with self._lock:
                if head.seq < self._head.seq:
                    return
                self._head = head
                write_atomic(self.path, json.dumps(head_document(head, self.key), sort_keys=True).encode() + b"\n")
                self.telemetry.record_audit_head(head.seq, head.hash, head.signature, self.key.fingerprint)
        except Exception:  # the commit happened; the next one publishes again
            log.exception("could not publish the audit head (seq %d)", head.seq)


@dataclass(frozen=True)
class HeadMismatch:
    """The head file of the previous run disagrees with the database."""

    problem: str
    #: The head the file holds, when it could be read.
    published: ChainHead | None = None

    def details(self) -> dict[str, object]:
        """The ``audit.head_mismatch`` event's details."""
        found: dict[str, object] = {"problem": self.problem}
        if self.published is not None:
            found["published_head"] = {
                "seq": self.published.seq,
                "hash": self.published.hash,
                "signature": self.published.signature,
            }
        return found


def compare_with_database(path: Path, session: Session, key: AuditPublicKey) -> HeadMismatch | None:
    """What is wrong between the head file of the previous run and the database, or None.

    A database ahead of the file is normal (a crash between a commit and the file's rewrite); a
    database that lacks the file's event, or holds another one at its seq, lost or changed events
    since (tampering, or a restore of the database alone from an older backup).
    """
    try:
        published = read_head_file(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        return HeadMismatch(f"the head file is unreadable: {error}")
    head = published.head
    if published.fingerprint != key.fingerprint:
        return HeadMismatch(
            f"the head file was signed by another audit key (fingerprint {published.fingerprint[:16]}…, now "
            f"{key.fingerprint[:16]}…): the signing key was replaced",
            head,
        )
    if head.seq and not key.verify(head_signing_message(head.seq, head.hash), head.signature):
        return HeadMismatch(f"the head file's signature (seq {head.seq}) does not verify: the file was edited", head)
    stored = AuditLog.head(session)
    if head.seq > stored.seq:
        return HeadMismatch(
            f"the database's newest audit event is seq {stored.seq} but the head published before is seq {head.seq}: "
            "events were deleted (or the database was restored from an older backup without the data directory)",
            head,
        )
    if head.seq:
        found = session.scalar(select(AuditEvent.hash).where(AuditEvent.seq == head.seq))
        if found != head.hash:
            return HeadMismatch(
                f"audit event {head.seq} in the database differs from the head published before "
                f"({head.hash[:16]}…): the audit log was rewritten",
                head,
            )
    return None
