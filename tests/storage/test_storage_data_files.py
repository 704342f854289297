"""Data-file repository: accounting of kept and purged files."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from server.storage import DataFile, DataFileKind, DataFileRepository

SHA = "ab" * 32


def _file(kind: DataFileKind, task: str, path: str, size: int) -> DataFile:
    return DataFile(kind=kind, task=task, path=path, bytes=size, sha256=SHA, job_id=None)


def test_purge_accounting(session_factory: sessionmaker[Session]) -> None:
    big = 5 * 2**30  # beyond 32-bit: BigInteger
    with session_factory.begin() as session:
        files = DataFileRepository(session)
        files.add(_file(DataFileKind.SPOOL, "a", "spool/a/job1.bin", 1000))
        files.add(_file(DataFileKind.RETAINED, "a", "retained/a.npz", big))
        files.add(_file(DataFileKind.PROBE, "a", "probe/a.npz", 200))
        files.add(_file(DataFileKind.RETAINED, "b", "retained/b.npz", 300))
        assert files.total_live_bytes() == 1000 + big + 200 + 300
        assert files.total_live_bytes(DataFileKind.RETAINED) == big + 300

    with session_factory.begin() as session:
        files = DataFileRepository(session)
        purged = [files.mark_purged(data_file.path) for data_file in files.live(task="a", kind=DataFileKind.RETAINED)]
        purged.append(files.mark_purged("./spool/a/job1.bin"))  # normalized to the stored path
        assert [data_file.path for data_file in purged if data_file is not None] == [
            "retained/a.npz",
            "spool/a/job1.bin",
        ]
        assert all(data_file is not None and data_file.purged_at is not None for data_file in purged)

    with session_factory.begin() as session:
        files = DataFileRepository(session)
        assert files.mark_purged("retained/a.npz") is None  # already purged: counted once
        assert files.mark_purged("never/recorded.bin") is None
        assert [data_file.path for data_file in files.live()] == ["probe/a.npz", "retained/b.npz"]
        assert [data_file.path for data_file in files.live(task="a")] == ["probe/a.npz"]
        assert files.total_live_bytes() == 500
        assert files.total_live_bytes(DataFileKind.RETAINED) == 300
        assert files.total_purged_bytes() == 1000 + big
        assert files.total_purged_bytes(DataFileKind.SPOOL) == 1000
        record = files.get("retained/a.npz")
        assert record is not None and record.bytes == big and record.sha256 == SHA
        assert record.purged_at is not None and record.purged_at.tzinfo is not None


def test_paths_are_relative_and_unique(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        files = DataFileRepository(session)
        for bad in ("/etc/passwd", "../outside.bin", "spool/../../x", "", "."):
            with pytest.raises(ValueError, match="relative"):
                files.add(_file(DataFileKind.SPOOL, "a", bad, 1))
        files.add(_file(DataFileKind.CHECKPOINT, "", "checkpoints/model-1.pt", 10))
    with pytest.raises(IntegrityError), session_factory.begin() as session:
        DataFileRepository(session).add(_file(DataFileKind.CHECKPOINT, "", "checkpoints//model-1.pt", 10))
