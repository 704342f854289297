"""Signed forgetting certificates: one self-contained document a third party checks offline.

A certificate answers, for one successful UNLEARN job (a whole task, or records):

* what was asked: the job, its task, method, reason and principal, and for a records request the
  number of samples and tasks affected;
* when: the request's ``created_at``, ``started_at`` and ``finished_at``;
* what was deleted, with digests: every file listed by the deletion events that belong to the
  request (below), flattened with the event that proves it;
* the verification numbers: the job's metrics (``forget_verified``, ``forget_gap``, the probe's
  interval, MIA, spill, ...);
* the model version from which it holds (the job's), and the newest one now;
* what is still held and why (a probe set kept to measure relapse, a checkpoint not yet pruned);
* where it sits in the audit chain: every cited event in full (fields, ``prev_hash``, ``hash``,
  ``signature``: each one can be checked against the chain and the key on its own), and the head
  at issue time.

The deletion events cited: every ``data.purged``, ``checkpoint.pruned`` and ``samples.forgotten``
event of the job; for a task request also every later ``data.purged`` event of the task (its
probe set, purged after ``training.forget_probe_ops`` operations, and the spool of a learn the
request cancelled); and every later ``checkpoint.pruned`` event that deleted a checkpoint of a model
version older than the job's (such a checkpoint still held the forgotten data's influence).

The document is canonical JSON (sorted keys, compact, ASCII), signed by the audit key over
``lethe-forgetting-certificate:`` + the document. It is built inside one transaction that holds the
audit head's lock, so nothing audited changes while it is read, and the same transaction appends
``proof.issued`` with the document's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from protos.audit_chain import ChainHead, certificate_signing_message, format_timestamp
from protos.audit_signing import AuditSigningKey
from server.data.layout import parse_checkpoint_name
from server.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from server.jobs.checkpoint_rows import model_checkpoints
from server.storage import (
    AUDIT_HEAD_ID,
    AuditEvent,
    AuditHead,
    AuditLog,
    DataFileKind,
    DataFileRepository,
    Job,
    JobKind,
    JobRepository,
    JobState,
    TaskRepository,
    utc_now,
)

#: ``type`` of the document; ``version`` changes when its layout does.
CERTIFICATE_TYPE, CERTIFICATE_VERSION = "lethe.forgetting-certificate", 1
#: Audit actions whose details list deleted or rewritten files.
DELETION_ACTIONS = ("data.purged", "checkpoint.pruned", "samples.forgotten")


@dataclass(frozen=True)
class IssuedCertificate:
    """A signed certificate: the canonical document, its signature (hex) and the public key (PEM)."""

    document: bytes
    signature: str
    public_key: str


def canonical_document(document: dict[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, compact separators, ASCII, no NaN."""
    return json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _when(at: datetime | None) -> str | None:
    return format_timestamp(at) if at is not None else None


def _event(e: AuditEvent) -> dict[str, Any]:
    """An audit event in full: enough to recompute its hash and check its signature."""
    return {
        "seq": e.seq,
        "at": format_timestamp(e.at),
        "principal": e.principal,
        "action": e.action,
        "task": e.task,
        "job_id": e.job_id,
        "details": e.details,
        "prev_hash": e.prev_hash,
        "hash": e.hash,
        "signature": e.signature,
    }


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in sorted(metrics.items()) if math.isfinite(v)}


class ProofService:
    """Issues forgetting certificates signed with the audit key, and tells the signed audit head.

    Args:
        sessions: The server's session factory.
        audit_log: The server's (signed) audit log: ``proof.issued`` is appended to it.
        key: The audit signing key.
        published_head: The newest committed head, as published outside the database
            (:attr:`server.audit_head.AuditHeadPublisher.current`).
        clock: Source of ``issued_at``.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        audit_log: AuditLog,
        key: AuditSigningKey,
        published_head: Callable[[], ChainHead],
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.sessions = sessions
        self.audit_log = audit_log
        self.key = key
        self.published_head = published_head
        self.clock = clock

    def audit_head(self) -> ChainHead:
        """The signed head of the audit chain this server last committed (not read from the database).

        A client compares it with the events it reads: events deleted from the database together with
        the head row show as a head ahead of the events.
        """
        return self.published_head()

    def certificate(self, *, task: str = "", job_id: str = "", principal: str) -> IssuedCertificate:
        """The certificate of ``job_id``, or of ``task``'s newest successful unlearn; audited as ``proof.issued``.

        Raises:
            InvalidArgumentError: Neither or both of ``task`` and ``job_id``.
            NotFoundError: No such task or job.
            FailedPreconditionError: The job is not a SUCCEEDED UNLEARN, or the task has none.
        """
        if bool(task) == bool(job_id):
            raise InvalidArgumentError(
                "task", "give the unlearned task or the unlearn job_id (exactly one)", reason="ONE_OF_TASK_OR_JOB"
            )
        with self.sessions() as session, session.begin():
            # The head's lock: no audited change commits while the certificate is read.
            head = session.scalars(
                select(AuditHead)
                .where(AuditHead.id == AUDIT_HEAD_ID)
                .with_for_update()
                .execution_options(populate_existing=True)
            ).one()
            job = self._job(session, task, job_id)
            document = self._document(session, job, head, principal)
            signature = self.key.sign(certificate_signing_message(document))
            self.audit_log.append(
                session,
                principal=principal,
                action="proof.issued",
                task=job.task,
                job_id=job.id,
                details={
                    "certificate_sha256": hashlib.sha256(document).hexdigest(),
                    "head_seq": head.last_seq,
                    "public_key_fingerprint": self.key.public_key.fingerprint,
                },
            )
        return IssuedCertificate(document, signature, self.key.public_key.pem)

    @staticmethod
    def _job(session: Session, task: str, job_id: str) -> Job:
        jobs = JobRepository(session)
        if job_id:
            job = jobs.get(job_id)
            if job is None:
                raise NotFoundError(
                    f"job {job_id!r} does not exist", reason="JOB_NOT_FOUND", metadata={"job_id": job_id}
                )
            if job.kind != JobKind.UNLEARN or job.state != JobState.SUCCEEDED:
                raise FailedPreconditionError(
                    f"job {job_id} is a {job.state.value} {job.kind.value} job; certificates are issued for "
                    "succeeded unlearn jobs only",
                    reason="NO_CERTIFICATE",
                    metadata={"job_id": job_id},
                )
            return job
        found = TaskRepository(session).get(task)
        if found is None:
            raise NotFoundError(f"task {task!r} does not exist", reason="TASK_NOT_FOUND", metadata={"task": task})
        newest = session.scalars(
            select(Job)
            .where(Job.task == task, Job.kind == JobKind.UNLEARN, Job.state == JobState.SUCCEEDED)
            .order_by(Job.seq.desc())
            .limit(1)
        ).one_or_none()
        if newest is None:
            raise FailedPreconditionError(
                f"task {task!r} ({found.state.value}) has no succeeded unlearn job",
                reason="NO_CERTIFICATE",
                metadata={"task": task},
            )
        return newest

    def _document(self, session: Session, job: Job, head: AuditHead, principal: str) -> bytes:
        metrics = _finite(job.metrics)
        own = list(session.scalars(select(AuditEvent).where(AuditEvent.job_id == job.id).order_by(AuditEvent.seq)))
        first = own[0].seq if own else 0
        records = "samples_forgotten" in metrics
        deletions = self._deletions(session, job, first, records)
        cited = {e.seq: e for e in [*own, *deletions]}
        deleted = [
            {**f, "event_seq": e.seq, "action": e.action}
            for e in sorted(deletions, key=lambda e: e.seq)
            for f in e.details.get("files", [])
            if isinstance(f, dict)
        ]
        request: dict[str, Any] = {
            "job_id": job.id,
            "kind": "records" if records else "task",
            "task": job.task,
            "method": job.method,
            "reason": str(job.options.get("reason", "")),
            "principal": job.principal,
            "created_at": _when(job.created_at),
            "started_at": _when(job.started_at),
            "finished_at": _when(job.finished_at),
        }
        if records:
            request["samples"] = int(metrics["samples_forgotten"])
            request["tasks_affected"] = int(metrics.get("tasks_affected", 0))
        verified = metrics.get("forget_verified")
        current = JobRepository(session).max_model_version()
        document = {
            "type": CERTIFICATE_TYPE,
            "version": CERTIFICATE_VERSION,
            "issued_at": format_timestamp(self.clock()),
            "issued_to": principal,
            "request": request,
            "outcome": {
                "state": job.state.value,
                "message": job.message,
                "model_version": job.model_version,
                "current_model_version": max(current, job.model_version),
                "forget_verified": None if verified is None else verified == 1.0,
            },
            "verification": metrics,
            "deleted": deleted,
            "deleted_bytes": sum(_int(f.get("bytes_at_deletion", f.get("bytes"))) for f in deleted),
            "still_held": self._still_held(session, job, records),
            "summary": _summary(job, request, metrics, deleted),
            "audit": {
                "events": [_event(cited[seq]) for seq in sorted(cited)],
                "head": {"seq": head.last_seq, "hash": head.last_hash, "signature": head.signature},
                "public_key_fingerprint": self.key.public_key.fingerprint,
            },
            "public_key": self.key.public_key.pem,
        }
        return canonical_document(document)

    @staticmethod
    def _deletions(session: Session, job: Job, first: int, records: bool) -> list[AuditEvent]:
        """The deletion events that belong to the request (see the module's docstring)."""
        if not first:
            return []
        belongs = [AuditEvent.job_id == job.id, AuditEvent.action == "checkpoint.pruned"]
        if not records and job.task:
            belongs.append(AuditEvent.task == job.task)
        candidates = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.seq >= first, AuditEvent.action.in_(DELETION_ACTIONS), or_(*belongs))
            .order_by(AuditEvent.seq)
        )
        found = []
        for e in candidates:
            if e.job_id == job.id:
                found.append(e)
            elif e.action == "checkpoint.pruned":
                if any(_older(f, job.model_version) for f in e.details.get("files", [])):
                    found.append(e)
            elif e.action == "data.purged":  # the task's own files, purged later or by a cancelled learn
                found.append(e)
        return found

    @staticmethod
    def _still_held(session: Session, job: Job, records: bool) -> list[dict[str, Any]]:
        """Files that may still hold what was forgotten, with the reason they are kept."""
        files = DataFileRepository(session)
        held: list[dict[str, Any]] = []
        if not records and job.task:
            for f in files.live(task=job.task):
                why = (
                    "probe set kept for training.forget_probe_ops operations to measure relapse (held-out samples, "
                    "never trained on)"
                    if f.kind == DataFileKind.PROBE
                    else "not yet purged"
                )
                held.append({"path": f.path, "kind": f.kind.value, "bytes": f.bytes, "sha256": f.sha256, "why": why})
        for f in model_checkpoints(session):
            parsed = parse_checkpoint_name(f.path)
            if parsed is not None and parsed.version < job.model_version:
                held.append(
                    {
                        "path": f.path,
                        "kind": f.kind.value,
                        "bytes": f.bytes,
                        "sha256": f.sha256,
                        "why": f"checkpoint of model version {parsed.version}, older than the unlearn, not yet pruned",
                    }
                )
        return held


def _older(entry: object, version: int) -> bool:
    if not isinstance(entry, dict):
        return False
    found = entry.get("model_version")
    return isinstance(found, int) and found < version


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _summary(job: Job, request: dict[str, Any], metrics: dict[str, float], deleted: Iterable[dict[str, Any]]) -> str:
    files = list(deleted)
    what = (
        f"{request.get('samples', 0)} samples over {request.get('tasks_affected', 0)} task(s)"
        if request["kind"] == "records"
        else f"task {job.task!r}"
    )
    verdict = {1.0: "verified", 0.0: "NOT verified"}.get(metrics.get("forget_verified", math.nan), "not measured")
    return (
        f"Unlearn job {job.id} forgot {what} at the request of {job.principal or 'unknown'} "
        f"(reason: {request['reason'] or 'none given'}), requested {request['created_at']}, finished "
        f"{request['finished_at']}; it holds from model version {job.model_version} on; {len(files)} file(s) "
        f"deleted or rewritten; forgetting {verdict}."
    )
