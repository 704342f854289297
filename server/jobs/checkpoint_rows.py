"""Checkpoints as ``data_files`` rows: recorded, completed, and purged with an audited proof.

A checkpoint holds the influence of every job up to its model version, forgotten data included,
so its life is accounted like a data file's (DESIGN.md section 9):

1. :func:`record_intent`: a row (kind ``checkpoint``, task ``""``, the job's id, no digest yet) is
   committed before the file is written, so no checkpoint on disk is ever unaccounted for;
2. :func:`written_by` / :func:`complete`: the file's size and SHA-256 are read before the job's
   commit transaction and stored in it;
3. :func:`prune`: once a newer checkpoint is the model's, older ones are marked purged with one
   ``checkpoint.pruned`` event (each file's digest read at deletion time), then deleted;
4. :func:`discard`: the checkpoint of a job that did not commit is deleted and its row purged;
5. :func:`reconcile` (start-up): the newest checkpoint gets a row if it has none (written before
   checkpoints were rows: ``checkpoint.recorded``), and every other row and file is pruned.

Database first, files after: a crash in between leaves a purged row whose file the next start
deletes, or (in :func:`discard`, which must delete first) a live row whose missing file the next
start records as ``missing``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from server.data import FileRecord
from server.data.layout import CHECKPOINTS, is_checkpoint_path, parse_checkpoint_name
from server.storage import DataFile, DataFileKind, DataFileRepository, Job

if TYPE_CHECKING:
    from server.checkpoints import Checkpoint
    from server.jobs.context import JobContext

log = logging.getLogger(__name__)


def model_checkpoints(session: Session) -> list[DataFile]:
    """Live rows of the model's checkpoints (kind ``checkpoint`` under ``checkpoints/``), oldest first.

    Other files of kind ``checkpoint`` (snapshots a strategy keeps for exact unlearning, say) are
    their owners' business: this module never prunes them.
    """
    rows = DataFileRepository(session).live(kind=DataFileKind.CHECKPOINT)
    return [f for f in rows if is_checkpoint_path(f.path)]


def record_intent(ctx: JobContext, job: Job) -> str:
    """Commit the row of the checkpoint ``job``'s attempt is about to write; return its path."""
    path = ctx.checkpoints.relative_path(ctx.strategy.version, job.id, job.attempts)

    def work() -> None:
        with ctx.transaction() as session:
            files = DataFileRepository(session)
            if files.get(path) is None:  # else recorded by this attempt before a database blip
                files.add(DataFile(kind=DataFileKind.CHECKPOINT, task="", job_id=job.id, path=path, bytes=0, sha256=""))

    ctx.retry(work, "recording the checkpoint")
    return path


def written_by(ctx: JobContext, job_id: str) -> FileRecord | None:
    """Size and digest of the checkpoint ``job_id`` wrote (read before its commit transaction)."""

    def query(session: Session) -> list[str]:
        return [f.path for f in model_checkpoints(session) if f.job_id == job_id]

    for path in reversed(ctx.read(query, "reading the job's checkpoint")):
        found = ctx.blobs.digest(path)
        if found is not None:
            return found
    return None


def complete(session: Session, record: FileRecord) -> None:
    """Store the checkpoint's size and digest on its row, inside the job's commit transaction."""
    row = DataFileRepository(session).get(record.path)
    if row is not None and row.purged_at is None:
        row.bytes, row.sha256 = record.bytes, record.sha256


def prune(ctx: JobContext, *, keep: str | None = None, job_id: str = "", why: str = "") -> None:
    """Purge (rows, with one audited proof) and delete every checkpoint but ``keep`` (the newest by default).

    Args:
        ctx: The job context.
        keep: The checkpoint the model is (or will be) loaded from.
        job_id: The job whose commit made the others obsolete ("" at start-up).
        why: The reason recorded in the proof (a default names ``keep``'s model version).
    """
    paths = ctx.checkpoints.paths()
    if keep is None and paths:
        keep = paths[0]
    kept = keep
    on_disk = [p for p in paths if p != keep]

    def query(session: Session) -> tuple[list[str], list[str]]:
        files = DataFileRepository(session)
        rows = [f.path for f in model_checkpoints(session) if f.path != kept]
        unrecorded = [p for p in on_disk if files.get(p) is None]
        return rows, unrecorded

    rows, unrecorded = ctx.read(query, "reading the checkpoint rows")
    found = {p: ctx.blobs.digest(p) for p in {*rows, *unrecorded}}
    version = parse_checkpoint_name(kept) if kept is not None else None
    reason = why or (
        f"replaced by the checkpoint of model version {version.version}" if version else "no checkpoint is kept"
    )

    def work() -> None:
        with ctx.transaction() as session:
            files = DataFileRepository(session)
            doomed = [f for p in rows if (f := files.get(p)) is not None and f.purged_at is None]
            missing_rows = [p for p in unrecorded if files.get(p) is None]
            ctx.lifecycle.prune_checkpoints(session, doomed, found, unrecorded=missing_rows, job_id=job_id, why=reason)

    if rows or unrecorded:
        ctx.retry(work, "recording pruned checkpoints")
    if keep is not None:
        ctx.checkpoints.prune(keep=keep)  # every file but keep: those purged now, and any purged before


def discard(ctx: JobContext, job_id: str) -> None:
    """Delete the checkpoint files of ``job_id`` (it did not commit), then purge their rows, audited.

    The files go first: a failed job's checkpoint must never be loaded as the model. Recording is
    best effort (the database may be why the job failed): the next start records a row left live
    as ``missing``.
    """
    paths = [p for p in ctx.blobs.names(CHECKPOINTS) if (n := parse_checkpoint_name(p)) and n.job_id == job_id]
    found: dict[str, FileRecord | None] = {}
    for p in paths:
        log.warning("discarding checkpoint %s of job %s, which did not commit", p, job_id)
        found[p] = ctx.blobs.delete(p)

    def work() -> None:
        with ctx.transaction() as session:
            doomed = [f for f in model_checkpoints(session) if f.job_id == job_id]
            why = "its job did not commit (failed, cancelled or interrupted): the model is the previous checkpoint's"
            ctx.lifecycle.prune_checkpoints(session, doomed, found, job_id=job_id, why=why)

    try:
        ctx.retry(work, "recording the discarded checkpoint")
    except Exception as error:  # the next start records it
        log.warning("could not record the discarded checkpoint of job %s (%s); the next start will", job_id, error)


def reconcile(ctx: JobContext, loaded: Checkpoint | None) -> None:
    """Start-up: give the loaded checkpoint a row if it has none, then prune every other one."""
    paths = ctx.checkpoints.paths()
    # The loaded one, unless finishing its job failed and discarded it (then the model was restored
    # from the newest one left); never a newer, unreadable file over the one the model came from.
    if loaded is not None and ctx.blobs.exists(loaded.path):
        keep: str | None = loaded.path
        job_id: str | None = loaded.meta.last_job_id
    else:
        keep, job_id = (paths[0] if paths else None), None
    if keep is not None:
        _adopt(ctx, keep, job_id)
    prune(
        ctx,
        keep=keep,
        why="start-up: not the checkpoint the model was loaded from (older, left by an interrupted job, or missing)",
    )


def _adopt(ctx: JobContext, keep: str, job_id: str | None) -> None:
    path = keep
    found = ctx.blobs.digest(path)
    if found is None:
        return

    def work() -> None:
        with ctx.transaction() as session:
            files = DataFileRepository(session)
            row = files.get(path)
            if row is None:
                files.add(
                    DataFile(
                        kind=DataFileKind.CHECKPOINT,
                        task="",
                        job_id=job_id or None,
                        path=path,
                        bytes=found.bytes,
                        sha256=found.sha256,
                    )
                )
                parsed = parse_checkpoint_name(path)
                ctx.lifecycle.audit_log.append(
                    session,
                    principal="system",
                    action="checkpoint.recorded",
                    job_id=job_id or "",
                    details={
                        "why": "the model's checkpoint had no data_files row (written before checkpoints were rows)",
                        "path": path,
                        "bytes": found.bytes,
                        "sha256": found.sha256,
                        "model_version": parsed.version if parsed is not None else None,
                    },
                )
            elif row.purged_at is None and not row.sha256:
                row.bytes, row.sha256 = found.bytes, found.sha256
            elif row.purged_at is not None:
                log.error("the model's checkpoint %s is recorded as purged; it is kept (the model needs it)", path)

    ctx.retry(work, "recording the model's checkpoint")
