"""Spool files: each accepted Learn stream, durably on disk before the RPC returns.

Layout: a sequence of ``.npy`` records, three per chunk (inputs float32 ``[n, *shape]``, labels int64
``[n]``, sample ids as a fixed-width unicode array ``[n]`` or ``[0]``). ``np.save``/``np.load`` write
and read them without pickling. The file is written as ``<name>.partial`` and renamed to its final
name only after fsync, so a spool file that exists is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np

from server.data.files import FileRecord, fsync_dir

#: Bytes between background fdatasync calls of a spool file.
_SYNC_EVERY = 32 << 20


class _HashingWriter:
    """Hashes, counts and writes what it is given on a background thread.

    The RPC thread keeps receiving and validating the next chunk while this thread hashes and writes
    the previous one (hashlib and file writes release the GIL for large buffers). A write error
    (e.g. a full disk) is raised on the RPC thread at the next write or at :meth:`finish`.
    """

    def __init__(self, f: BinaryIO, depth: int = 8) -> None:
        self._f = f
        self.digest = hashlib.sha256()
        self.bytes = 0
        self._queue: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="lethe-spool", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        unsynced = 0
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.digest.update(data)
                    self._f.write(data)
                    unsynced += len(data)
                    if unsynced >= _SYNC_EVERY:  # flush as we go, so the final fsync has little left
                        self._f.flush()
                        os.fdatasync(self._f.fileno())
                        unsynced = 0
                except BaseException as exc:  # reported on the RPC thread
                    self._error = exc

    def write(self, data: bytes | memoryview) -> int:
        if self._error is not None:
            raise self._error
        self.bytes += len(data)
        self._queue.put(data)
        return len(data)

    def finish(self) -> None:
        """Wait until everything queued is written; raise the first write error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


class SpoolWriter:
    """Appends validated chunks to a new spool file; :meth:`commit` makes it durable.

    Use as a context manager: leaving the block without :meth:`commit` deletes the partial file.
    """

    def __init__(self, root: Path, relative: str) -> None:
        self.root = root
        self.relative = relative
        self.path = root / relative
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = self.path.with_name(self.path.name + ".partial")
        self._file: BinaryIO = self._partial.open("wb")
        self._writer = _HashingWriter(self._file)
        self.samples = 0
        self._committed = False

    def append(self, inputs: np.ndarray, labels: np.ndarray, sample_ids: list[str]) -> None:
        """Append one chunk: float32 inputs ``[n, ...]``, int64 labels ``[n]``, ``n`` or zero sample ids."""
        ids = np.asarray(sample_ids, dtype=np.str_) if sample_ids else np.zeros((0,), dtype="<U1")
        for array in (
            np.ascontiguousarray(inputs, dtype=np.float32),
            np.ascontiguousarray(labels, dtype=np.int64),
            ids,
        ):
            self._write_npy(array)
        self.samples += int(labels.shape[0])

    def _write_npy(self, array: np.ndarray) -> None:
        """One ``.npy`` record, written straight from the array's buffer (np.save would copy it in pieces)."""
        np.lib.format.write_array_header_1_0(self._writer, np.lib.format.header_data_from_array_1_0(array))
        self._writer.write(array.data.cast("B"))

    @property
    def bytes(self) -> int:
        """Bytes written so far."""
        return self._writer.bytes

    def commit(self) -> FileRecord:
        """fsync the file, rename it to its final name, fsync the directory; return its record."""
        self._writer.finish()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._partial, self.path)
        fsync_dir(self.path.parent)
        self._committed = True
        return FileRecord(self.relative, self._writer.bytes, self._writer.digest.hexdigest())

    def abort(self) -> None:
        """Close and delete the partial file."""
        with contextlib.suppress(BaseException):  # the file is deleted anyway
            self._writer.finish()
        if not self._file.closed:
            self._file.close()
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> SpoolWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._committed:
            self.abort()


def read_spool(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a whole spool file back: ``(inputs, labels, sample_ids)`` with chunks concatenated."""
    inputs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    ids: list[str] = []
    size = path.stat().st_size
    with path.open("rb") as f:
        while f.tell() < size:
            x = np.load(f, allow_pickle=False)
            y = np.load(f, allow_pickle=False)
            s = np.load(f, allow_pickle=False)
            inputs.append(x)
            labels.append(y)
            ids.extend(str(v) for v in s)
    if not inputs:
        raise ValueError(f"spool file {path} is empty")
    return np.concatenate(inputs), np.concatenate(labels), ids
