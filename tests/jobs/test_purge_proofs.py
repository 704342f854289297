"""Purge proofs that deserve the name: deletion-time digests, and checkpoints as audited ``data_files`` rows.

A real job context (see :mod:`tests.jobs.harness`) on SQLite and PostgreSQL, each phase driven by hand.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from server.data import sha256_file
from server.data.layout import parse_checkpoint_name
from server.jobs import recovery
from server.storage import AuditEvent, AuditLog, DataFile, DataFileKind, DataFileRepository
from tests.crash_harness import unaccounted_files
from tests.jobs.harness import Harness, make_harness


def _events(h: Harness, action: str) -> list[AuditEvent]:
    with h.session() as session:
        return [e for e in AuditLog().list(session, limit=1000) if e.action == action]


def _rows(h: Harness, kind: DataFileKind) -> list[DataFile]:
    with h.session() as session:
        return list(session.query(DataFile).filter(DataFile.kind == kind).order_by(DataFile.id))


def _proven(events: list[AuditEvent]) -> dict[str, dict[str, Any]]:
    return {f["path"]: f for e in events for f in e.details["files"]}


def test_a_purge_records_the_bytes_on_disk_when_it_deletes_them(
    session_factory: sessionmaker[Session], migrated_url: str, tmp_path: Path
) -> None:
    """A member file changed after it was recorded, and a probe file already gone: the proof says so."""
    h = make_harness(session_factory, tmp_path, forget_probe_ops=0)  # the probe set goes with the unlearn
    h.learn("a", [0, 1])
    with h.session() as session:
        files = {f.kind: f for f in DataFileRepository(session).live(task="a")}
    member, probe = files[DataFileKind.MEMBER], files[DataFileKind.PROBE]
    changed = h.ctx.layout.absolute(member.path)
    changed_bytes = changed.read_bytes() + b"bytes written after the record"
    changed.write_bytes(changed_bytes)
    h.ctx.layout.absolute(probe.path).unlink()

    h.run(h.submit_unlearn("a").id)

    (purge,) = [e for e in _events(h, "data.purged") if e.task == "a" and e.details["why"] == "unlearned"]
    proven = _proven([purge])
    m = proven[member.path]
    assert (m["sha256"], m["bytes"]) == (member.sha256, member.bytes)  # as recorded at creation
    assert m["at_deletion"] == "present" and m["mismatch"] is True
    assert m["bytes_at_deletion"] == member.bytes + 30 and m["sha256_at_deletion"] != member.sha256
    p = proven[probe.path]
    assert p["at_deletion"] == "missing" and p["sha256_at_deletion"] is None and p["mismatch"] is False
    assert purge.details["mismatches"] == 1
    assert m["sha256_at_deletion"] == hashlib.sha256(changed_bytes).hexdigest()  # what was on disk
    assert not changed.exists()


def test_checkpoints_are_rows_completed_at_commit_and_pruned_with_a_proof(
    session_factory: sessionmaker[Session], migrated_url: str, tmp_path: Path
) -> None:
    h = make_harness(session_factory, tmp_path)
    first = h.learn("a", [0, 1])
    job = h.claim(h.submit_learn("b", [2, 3]).id)
    run = h.compute(job)

    # Written, not yet committed: its row exists (intent, no digest) before it is the model's.
    rows = {r.job_id: r for r in _rows(h, DataFileKind.CHECKPOINT)}
    intent = rows[job.id]
    assert (intent.task, intent.bytes, intent.sha256, intent.purged_at) == ("", 0, "", None)
    name = parse_checkpoint_name(intent.path)
    assert name is not None and (name.version, name.job_id, name.attempt) == (2, job.id, 1)
    assert h.ctx.layout.absolute(intent.path).is_file()

    h.finish(run)
    h.run(h.submit_unlearn("a").id)

    rows = {r.path: r for r in _rows(h, DataFileKind.CHECKPOINT)}
    live = [r for r in rows.values() if r.purged_at is None]
    on_disk = h.ctx.layout.checkpoint_files()
    assert [r.path for r in live] == on_disk and len(on_disk) == 1  # only the model's checkpoint is left
    (kept,) = live
    assert (kept.bytes, kept.sha256) == (
        h.ctx.layout.absolute(kept.path).stat().st_size,
        sha256_file(h.ctx.layout.absolute(kept.path)),
    )
    pruned = [r for r in rows.values() if r.purged_at is not None]
    assert {r.job_id for r in pruned} == {first.job.id, job.id}
    proofs = _events(h, "checkpoint.pruned")
    proven = _proven(proofs)
    for row in pruned:
        entry = proven[row.path]
        assert (entry["sha256"], entry["sha256_at_deletion"], entry["at_deletion"]) == (
            row.sha256,
            row.sha256,
            "present",
        )
        assert entry["model_version"] == parse_checkpoint_name(row.path).version  # type: ignore[union-attr]
        assert not h.ctx.layout.absolute(row.path).exists()
    # The unlearn's own commit pruned the checkpoint that still held task a: its proof names the unlearn.
    (unlearn,) = _events(h, "unlearn.succeeded")
    assert any(e.job_id == unlearn.job_id for e in proofs)
    assert unlearn.details["checkpoint"]["path"] == kept.path
    assert unaccounted_files(h.data_dir, migrated_url) == {}


def test_the_checkpoint_of_a_job_that_did_not_commit_is_discarded_with_a_proof(
    session_factory: sessionmaker[Session], migrated_url: str, tmp_path: Path
) -> None:
    h = make_harness(session_factory, tmp_path)
    h.learn("a", [0, 1])
    job = h.claim(h.submit_learn("b", [2, 3]).id)
    h.compute(job)  # its checkpoint is written; then the job fails before its commit
    (written,) = [r for r in _rows(h, DataFileKind.CHECKPOINT) if r.job_id == job.id]
    digest = sha256_file(h.ctx.layout.absolute(written.path))

    h.ctx.restore(discard_job=job.id)

    (row,) = [r for r in _rows(h, DataFileKind.CHECKPOINT) if r.job_id == job.id]
    assert row.purged_at is not None and not h.ctx.layout.absolute(row.path).exists()
    (proof,) = [e for e in _events(h, "checkpoint.pruned") if e.job_id == job.id]
    entry = _proven([proof])[row.path]
    assert (entry["at_deletion"], entry["sha256_at_deletion"]) == ("present", digest)
    assert "did not commit" in proof.details["why"]
    assert h.ctx.strategy.version == 1  # the model is the previous checkpoint's


def test_start_up_records_a_checkpoint_from_before_checkpoints_were_rows(
    session_factory: sessionmaker[Session], migrated_url: str, tmp_path: Path
) -> None:
    """An existing deployment: its checkpoint ``ckpt-<version>.pt`` has no row; the first start records it."""
    h = make_harness(session_factory, tmp_path)
    h.learn("a", [0, 1])
    (current,) = h.ctx.layout.checkpoint_files()
    legacy = h.ctx.layout.absolute("checkpoints/ckpt-0000000001.pt")
    h.ctx.layout.absolute(current).rename(legacy)
    with h.ctx.transaction() as session:
        session.execute(delete(DataFile).where(DataFile.kind == DataFileKind.CHECKPOINT))

    recovery.recover(h.ctx, lambda job, metrics: None)

    (row,) = _rows(h, DataFileKind.CHECKPOINT)
    assert (row.path, row.purged_at, row.sha256) == ("checkpoints/ckpt-0000000001.pt", None, sha256_file(legacy))
    (recorded,) = _events(h, "checkpoint.recorded")
    assert recorded.details["path"] == row.path and recorded.details["model_version"] == 1
    assert h.ctx.strategy.version == 1
    assert unaccounted_files(h.data_dir, migrated_url) == {}
