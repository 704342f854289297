"""Independent verification of what a server exports: its audit trail and its forgetting certificates.

Uses the same chain code as the server (:mod:`protos.audit_chain`, stdlib only) and ``cryptography``
for the Ed25519 signatures; no SQLAlchemy, no torch. Anyone holding the exported events
(``ListAuditEvents``), the signed head (``GetAuditHead``, or a copy of the server's
``audit-head.json``) and the server's public key can check offline that:

* no event was edited, reordered or removed from the middle (the hash chain);
* no suffix was rewritten, even with every hash and the stored head recomputed (each event's
  signature; unsigned events are accepted only as a prefix, written before signing existed);
* none of the newest events was deleted (the signed head names the newest event).

Without the public key only the hash chain is checked, which a database administrator can
recompute after any rewrite.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from protos import lethe_pb2 as pb
from protos.audit_chain import (
    ChainHead,
    ChainReport,
    ChainVerifier,
    canonical_json,
    certificate_signing_message,
    chain_hash,
    event_signing_message,
)
from protos.audit_signing import AuditPublicKey

#: ``format`` of a certificate file written by ``lethe proof``.
CERTIFICATE_FILE_FORMAT = "lethe.forgetting-certificate-file/1"


def verify_audit(
    events: Sequence[pb.AuditEvent], *, public_key: AuditPublicKey | None = None, head: ChainHead | None = None
) -> ChainReport:
    """Check a complete, oldest-first export; with a trusted public key also every signature and the head.

    Args:
        events: Every event, oldest first (``LetheClient.audit_events()``).
        public_key: The server's audit public key, obtained from a trusted source.
        head: The signed head published outside the database (``GetAuditHead`` or the head file),
            fetched *before* the events: events appended since are fine, fewer mean deleted ones.

    Returns:
        The report; ``first_bad_seq`` names the first event that does not verify.
    """
    checker = ChainVerifier(public_key.verify if public_key is not None else None, head)
    for event in events:
        if not checker.add(
            seq=event.seq,
            at=event.at.ToDatetime(tzinfo=UTC),
            principal=event.principal,
            action=event.action,
            task=event.task,
            job_id=event.job_id,
            details_json=event.details_json,
            prev_hash=event.prev_hash,
            hash=event.hash,
            signature=event.signature,
        ):
            break
    return checker.finish()


def verify_chain(events: Sequence[pb.AuditEvent]) -> str | None:
    """Check a complete, oldest-first export's hash chain; return None when intact, else what is wrong."""
    report = verify_audit(events)
    return None if report.ok else report.reason


def head_from_message(message: pb.AuditHead) -> ChainHead:
    """A ``GetAuditHead`` answer as a :class:`ChainHead`."""
    return ChainHead(message.seq, message.hash, message.signature)


def read_head_file(path: Path) -> tuple[ChainHead, str]:
    """A copy of the server's ``audit-head.json``: the head and the fingerprint of the key that signed it.

    Raises:
        ValueError: It is not a head file.
    """
    try:
        data = json.loads(path.read_text())
        return ChainHead(int(data["seq"]), str(data["hash"]), str(data["signature"])), str(
            data["public_key_fingerprint"]
        )
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not an audit head file ({error})") from None


def warnings_in(events: Sequence[pb.AuditEvent]) -> list[str]:
    """Events in which the server itself reports tampering it saw (``audit.head_mismatch``)."""
    return [
        f"event {e.seq} ({e.action}): {json.loads(e.details_json).get('problem', '')}"
        for e in events
        if e.action == "audit.head_mismatch"
    ]


# --------------------------------------------------------------------------- certificates
def certificate_file(message: pb.ForgettingCertificate) -> bytes:
    """The one self-contained file ``lethe proof`` writes: the signed document (its exact bytes, as a
    string), the signature and the public key, as JSON."""
    data = {
        "format": CERTIFICATE_FILE_FORMAT,
        "document": message.document.decode("ascii"),
        "signature": message.signature,
        "public_key": message.public_key,
    }
    return (json.dumps(data, indent=2) + "\n").encode()


@dataclass(frozen=True)
class CertificateCheck:
    """What :func:`verify_certificate` found.

    Attributes:
        ok: Whether the signature verifies (with the trusted key, when one was given).
        reason: What was found, in words.
        origin_verified: Whether a trusted public key was given and it is the signer's: without one the
            embedded key is used, which proves integrity (nothing was changed since signing) but not
            origin (anyone can sign a document with a key of their own).
        certificate: The parsed document, when it could be parsed.
        fingerprint: The fingerprint of the key that signed it.
        event_problems: Cited audit events whose hash or signature does not check out.
    """

    ok: bool
    reason: str
    origin_verified: bool = False
    certificate: Mapping[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    event_problems: tuple[str, ...] = ()


def verify_certificate(data: bytes, trusted_key: AuditPublicKey | None = None) -> CertificateCheck:
    """Verify a certificate file offline: the signature over the exact document, the key, the cited events.

    Args:
        data: The file's bytes (:func:`certificate_file`).
        trusted_key: The server's public key from a trusted source; ``None`` uses the embedded one.
    """
    try:
        outer = json.loads(data)
        document = str(outer["document"]).encode("ascii")
        signature, embedded_pem = str(outer["signature"]), str(outer["public_key"])
        if outer.get("format") != CERTIFICATE_FILE_FORMAT:
            return CertificateCheck(False, f"not a Lethe certificate file (format {outer.get('format')!r})")
        embedded = AuditPublicKey.from_pem(embedded_pem)
    except (ValueError, TypeError, KeyError, UnicodeEncodeError) as error:
        return CertificateCheck(False, f"not a readable certificate file: {error}")
    key = trusted_key or embedded
    if trusted_key is not None and trusted_key != embedded:
        return CertificateCheck(
            False,
            f"signed by another key: the certificate names {embedded.fingerprint[:16]}…, the trusted key is "
            f"{trusted_key.fingerprint[:16]}…",
            fingerprint=embedded.fingerprint,
        )
    if not key.verify(certificate_signing_message(document), signature):
        return CertificateCheck(
            False, "the signature does not verify: the document was changed after signing", fingerprint=key.fingerprint
        )
    try:
        certificate = json.loads(document)
    except ValueError as error:  # signed, but not JSON: not one of ours
        return CertificateCheck(False, f"the signed document is not JSON: {error}", fingerprint=key.fingerprint)
    if not isinstance(certificate, dict) or certificate.get("public_key") != embedded_pem:
        return CertificateCheck(False, "the document does not name the key next to it", fingerprint=key.fingerprint)
    problems = tuple(_event_problems(certificate, key))
    reason = "signature valid" + (
        " with the trusted public key: the server holding that key issued it, and it is unchanged"
        if trusted_key is not None
        else " with the embedded public key: it is unchanged since signing, but this does not prove who signed it "
        "(pass the server's public key to check the origin)"
    )
    if problems:
        return CertificateCheck(
            False, "cited audit events do not verify", False, certificate, key.fingerprint, problems
        )
    return CertificateCheck(True, reason, trusted_key is not None, certificate, key.fingerprint)


def _event_problems(certificate: Mapping[str, Any], key: AuditPublicKey) -> list[str]:
    """Recompute each cited audit event's hash from its fields, and check its signature."""
    problems = []
    events = certificate.get("audit", {}).get("events", [])
    for e in events if isinstance(events, list) else []:
        try:
            canonical = canonical_json(
                seq=int(e["seq"]),
                at=datetime.fromisoformat(e["at"]),
                principal=e["principal"],
                action=e["action"],
                task=e["task"],
                job_id=e["job_id"],
                details=e["details"],
            )
        except (KeyError, TypeError, ValueError) as error:
            problems.append(f"an event cannot be read: {error}")
            continue
        if chain_hash(e["prev_hash"], canonical) != e["hash"]:
            problems.append(f"event {e['seq']}: its hash does not match its fields")
        elif e.get("signature") and not key.verify(event_signing_message(e["hash"]), e["signature"]):
            problems.append(f"event {e['seq']}: its signature does not verify")
    return problems
