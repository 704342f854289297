"""Blobs as files under one directory: the data directory (the default) or a shared volume.

A blob is written to ``<name>.partial``, fdatasynced every :data:`SYNC_EVERY` bytes as it grows
(so the final fsync has little left), fsynced, renamed to its name, and the directory fsynced: a
file that exists under its name is complete and durable. Reads open the file itself (seekable, no copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from server.data.blobs.store import BlobStore, BlobWriter
from server.data.files import FileRecord, fsync_dir, sha256_file
from server.data.layout import TEMPORARY_SUFFIXES

#: Bytes between background fdatasync calls of a file being written.
SYNC_EVERY = 32 << 20
#: Suffix of a file being written.
PARTIAL = ".partial"


class FileBlobWriter(BlobWriter):
    """Writes ``<root>/<relative>.partial``; :meth:`commit` renames it to its name."""

    def __init__(self, root: Path, relative: str) -> None:
        super().__init__(relative)
        self.path = root / relative
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + PARTIAL)
        self._file: BinaryIO = self._partial.open("wb")
        self._digest = hashlib.sha256()
        self._bytes = 0
        self._unsynced = 0

    @property
    def written(self) -> int:
        """Bytes written so far."""
        return self._bytes

    def write(self, data: bytes | memoryview) -> int:
        """Hash and append ``data``; fdatasync every :data:`SYNC_EVERY` bytes."""
        self._digest.update(data)
        self._file.write(data)
        self._bytes += len(data)
        self._unsynced += len(data)
        if self._unsynced >= SYNC_EVERY:
            self._file.flush()
            os.fdatasync(self._file.fileno())
            self._unsynced = 0
        return len(data)

    def commit(self) -> FileRecord:
        """fsync the file, rename it to its name, fsync the directory."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._partial, self.path)
        fsync_dir(self.path.parent)
        self._done = True
        return FileRecord(self.relative, self._bytes, self._digest.hexdigest())

    def abort(self) -> None:
        """Close and delete the partial file."""
        self._done = True
        with contextlib.suppress(OSError):
            self._file.close()
        self._partial.unlink(missing_ok=True)


class FileBlobStore(BlobStore):
    """Blobs as files under ``root`` (see the module doc)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"the directory {root}"

    def writer(self, relative: str) -> FileBlobWriter:
        """A writer of ``<root>/<relative>``."""
        return FileBlobWriter(self.root, relative)

    def open(self, relative: str) -> BinaryIO:
        """The file itself, opened for reading."""
        return (self.root / relative).open("rb")

    def exists(self, relative: str) -> bool:
        """Whether the file exists."""
        return (self.root / relative).is_file()

    def digest(self, relative: str) -> FileRecord | None:
        """Size and SHA-256 of the file as it is now, or None when there is no such file."""
        path = self.root / relative
        try:
            return FileRecord(relative, path.stat().st_size, sha256_file(path))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def delete(self, relative: str) -> FileRecord | None:
        """Digest the file, unlink it, fsync its directory."""
        path = self.root / relative
        try:
            size = path.stat().st_size
            digest = sha256_file(path)
            path.unlink()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        fsync_dir(path.parent)
        return FileRecord(relative, size, digest)

    def names(self, folder: str) -> list[str]:
        """Files directly in ``folder`` that are not being written."""
        return [f"{folder}/{name}" for name in self._names(folder) if not name.endswith(TEMPORARY_SUFFIXES)]

    def remove_temporary(self, folder: str) -> list[str]:
        """Unlink the ``.partial``/``.tmp`` files in ``folder``."""
        removed = [f"{folder}/{name}" for name in self._names(folder) if name.endswith(TEMPORARY_SUFFIXES)]
        for relative in removed:
            (self.root / relative).unlink(missing_ok=True)
        if removed:
            fsync_dir(self.root / folder)
        return removed

    def _names(self, folder: str) -> list[str]:
        directory = self.root / folder
        if not directory.is_dir():
            return []
        return sorted(p.name for p in directory.iterdir() if p.is_file())
