"""Data-file repository: every file kept under the data directory, and what was purged."""

from __future__ import annotations

import builtins
from collections.abc import Callable
from datetime import datetime
from pathlib import PurePosixPath

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.storage.column_types import utc_now
from server.storage.enums import DataFileKind
from server.storage.models import DataFile


def normalize_data_path(path: str) -> str:
    """Checks that ``path`` is relative to the data directory and returns it in POSIX form.

    Raises:
        ValueError: If the path is empty, absolute, or leaves the data directory (``..``).
    """
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or str(pure) in ("", "."):
        raise ValueError(f"data file path must be relative to the data directory, without '..': {path!r}")
    return str(pure)


class DataFileRepository:
    """Reads and writes :class:`DataFile` rows inside the caller's transaction (never commits).

    Args:
        session: The session whose transaction the caller owns.
        clock: Source of ``created_at`` and ``purged_at``.
    """

    def __init__(self, session: Session, clock: Callable[[], datetime] = utc_now) -> None:
        self.session = session
        self.clock = clock

    def add(self, data_file: DataFile) -> DataFile:
        """Records a file (flushed); its path is normalized, ``created_at`` defaults to the clock.

        Raises:
            ValueError: If the path is not relative to the data directory.
            sqlalchemy.exc.IntegrityError: If the path is already recorded.
        """
        data_file.path = normalize_data_path(data_file.path)
        if data_file.created_at is None:
            data_file.created_at = self.clock()
        self.session.add(data_file)
        self.session.flush()
        return data_file

    def get(self, path: str) -> DataFile | None:
        """Returns the record of ``path`` (live or purged), or ``None``."""
        statement = select(DataFile).where(DataFile.path == normalize_data_path(path))
        return self.session.scalars(statement).one_or_none()

    def live(
        self, task: str | None = None, kind: DataFileKind | None = None, job_id: str | None = None
    ) -> builtins.list[DataFile]:
        """Returns files not yet purged, oldest first, optionally of one task, kind and/or job."""
        statement = select(DataFile).where(DataFile.purged_at.is_(None)).order_by(DataFile.id)
        if task is not None:
            statement = statement.where(DataFile.task == task)
        if job_id is not None:
            statement = statement.where(DataFile.job_id == job_id)
        if kind is not None:
            statement = statement.where(DataFile.kind == kind)
        return builtins.list(self.session.scalars(statement))

    def mark_purged(self, path: str) -> DataFile | None:
        """Marks a live file purged (the caller deletes it from disk); the record is kept for audit.

        Returns:
            The record, now with ``purged_at`` set, or ``None`` if no live file has that path
            (unknown, or purged before), so purging twice is harmless and counted once.
        """
        statement = select(DataFile).where(DataFile.path == normalize_data_path(path), DataFile.purged_at.is_(None))
        data_file = self.session.scalars(statement).one_or_none()
        if data_file is None:
            return None
        data_file.purged_at = self.clock()
        self.session.flush()
        return data_file

    def purged_paths(self) -> builtins.list[str]:
        """Returns the paths of every purged file (start-up checks that none is left on disk)."""
        statement = select(DataFile.path).where(DataFile.purged_at.is_not(None)).order_by(DataFile.id)
        return builtins.list(self.session.scalars(statement))

    def total_live_bytes(self, kind: DataFileKind | None = None) -> int:
        """Returns the bytes of all files not yet purged, optionally of one kind."""
        statement = select(func.coalesce(func.sum(DataFile.bytes), 0)).where(DataFile.purged_at.is_(None))
        if kind is not None:
            statement = statement.where(DataFile.kind == kind)
        return int(self.session.scalar(statement) or 0)

    def total_purged_bytes(self, kind: DataFileKind | None = None) -> int:
        """Returns the bytes of all files purged so far, optionally of one kind."""
        statement = select(func.coalesce(func.sum(DataFile.bytes), 0)).where(DataFile.purged_at.is_not(None))
        if kind is not None:
            statement = statement.where(DataFile.kind == kind)
        return int(self.session.scalar(statement) or 0)
