"""The blob store interface: every byte of task data and every checkpoint goes through it.

A blob is named by a relative data path (``spool/<job>.spool``, ``checkpoints/ckpt-...pt``: see
:mod:`server.data.layout`) and is written once, atomically: a reader sees the whole blob or none.
Backends (chosen by ``storage.blob_url``, see :func:`server.data.blobs.open_blob_store`):

* :class:`~server.data.blobs.files.FileBlobStore`: files under a directory (the data directory by
  default, or a shared volume), written to a temporary name, fsynced and renamed;
* :class:`~server.data.blobs.postgres.PostgresBlobStore`: chunked ``bytea`` rows in the server's
  PostgreSQL database, published in one transaction.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from types import TracebackType
from typing import BinaryIO

import numpy as np

from server.data.files import FileRecord


class BlobWriter(ABC):
    """Writes one blob incrementally; :meth:`commit` publishes it atomically, :meth:`abort` drops it.

    Use as a context manager: leaving the block without :meth:`commit` aborts. ``write`` calls come
    from one thread at a time (not necessarily the one that made the writer).
    """

    def __init__(self, relative: str) -> None:
        self.relative = relative
        self._done = False

    @property
    @abstractmethod
    def written(self) -> int:
        """Bytes written so far."""

    @abstractmethod
    def write(self, data: bytes | memoryview) -> int:
        """Append ``data``; return its length."""

    @abstractmethod
    def commit(self) -> FileRecord:
        """Make the blob durable and visible under its path (replacing any blob there); return its record."""

    @abstractmethod
    def abort(self) -> None:
        """Drop what was written (never raises for a writer already committed or aborted)."""

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._done:
            self.abort()


class BlobStore(ABC):
    """Blobs named by relative data paths (see the module doc)."""

    #: Where the blobs are, in words (for logs and errors).
    description: str = ""

    @abstractmethod
    def writer(self, relative: str) -> BlobWriter:
        """A writer of a new blob at ``relative`` (see :class:`BlobWriter`)."""

    def write(self, relative: str, data: bytes | memoryview) -> FileRecord:
        """Write a whole blob atomically from bytes; return its record (path, size, SHA-256)."""
        with self.writer(relative) as writer:
            writer.write(data)
            return writer.commit()

    @abstractmethod
    def open(self, relative: str) -> BinaryIO:
        """The blob as a readable, seekable binary stream (close it; use as a context manager).

        Raises:
            FileNotFoundError: there is no blob at ``relative``.
        """

    @abstractmethod
    def exists(self, relative: str) -> bool:
        """Whether a (published) blob is at ``relative``."""

    @abstractmethod
    def digest(self, relative: str) -> FileRecord | None:
        """Size and SHA-256 of the blob's bytes as they are now (read in full), or None when there is none."""

    @abstractmethod
    def delete(self, relative: str) -> FileRecord | None:
        """Delete a blob durably; return the size and SHA-256 of the bytes removed (None: there was none).

        The digest is of the bytes actually removed, read at deletion time: what a purge proof records.
        """

    @abstractmethod
    def names(self, folder: str) -> list[str]:
        """Relative paths of the published blobs directly in ``folder``, sorted."""

    @abstractmethod
    def remove_temporary(self, folder: str) -> list[str]:
        """Delete what interrupted writes left in ``folder``; return their names (for the log).

        Only safe while nothing writes to ``folder`` (start-up, or the thread that writes there).
        """

    # ------------------------------------------------------------ helpers
    def read_bytes(self, relative: str) -> bytes:
        """The whole blob in memory (small blobs only)."""
        with self.open(relative) as f:
            return f.read()

    def save_arrays(self, relative: str, **arrays: np.ndarray) -> FileRecord:
        """Atomically write arrays as an uncompressed ``.npz`` (no pickled objects); return its record."""
        buffer = io.BytesIO()
        np.savez(buffer, allow_pickle=False, **arrays)
        return self.write(relative, buffer.getbuffer())

    def load_arrays(self, relative: str) -> dict[str, np.ndarray]:
        """Every array of an ``.npz`` written by :meth:`save_arrays` (read from the stream: one copy)."""
        with self.open(relative) as f, np.load(f, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
