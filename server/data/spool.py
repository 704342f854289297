"""Spool files: each accepted Learn stream, durably on disk before the RPC returns.

Layout: a sequence of ``.npy`` records, three per chunk (inputs float32 ``[n, *shape]``, labels int64
``[n]``, sample ids as a fixed-width unicode array ``[n]`` or ``[0]``). ``np.save``/``np.load`` write
and read them without pickling. The spool is a blob (:mod:`server.data.blobs`) written as the stream
arrives and published atomically at its end, so a spool that exists is complete.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np

from server.data.blobs.files import FileBlobStore
from server.data.blobs.store import BlobStore, BlobWriter
from server.data.files import FileRecord


class _BackgroundWriter:
    """Writes what it is given to a blob writer on a background thread.

    The RPC thread keeps receiving and validating the next chunk while this thread hashes and writes
    the previous one (hashlib, file writes and socket sends release the GIL for large buffers). A
    write error (e.g. a full disk) is raised on the RPC thread at the next write or at :meth:`finish`.
    """

    def __init__(self, sink: BlobWriter, depth: int = 8) -> None:
        self._sink = sink
        self.bytes = 0
        self._queue: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="lethe-spool", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._sink.write(data)
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
    """Appends validated chunks to a new spool blob; :meth:`commit` makes it durable and visible.

    Use as a context manager: leaving the block without :meth:`commit` drops what was written.

    Args:
        blobs: the blob store (a directory is taken as the data directory's files, for tools and tests).
        relative: the spool's data path.
    """

    def __init__(self, blobs: BlobStore | Path, relative: str) -> None:
        self.blobs = blobs if isinstance(blobs, BlobStore) else FileBlobStore(blobs)
        self.relative = relative
        self._sink = self.blobs.writer(relative)
        self._writer = _BackgroundWriter(self._sink)
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
        """Wait for the background writes, then publish the blob (fsync and rename, or one transaction)."""
        self._writer.finish()
        record = self._sink.commit()
        self._committed = True
        return record

    def abort(self) -> None:
        """Drop what was written."""
        with contextlib.suppress(BaseException):  # dropped anyway
            self._writer.finish()
        self._sink.abort()

    def __enter__(self) -> SpoolWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._committed:
            self.abort()


def read_spool(source: Path | BinaryIO) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a whole spool back: ``(inputs, labels, sample_ids)`` with chunks concatenated.

    Args:
        source: a spool file, or a seekable stream of one (e.g. ``BlobStore.open``).
    """
    if isinstance(source, Path):
        with source.open("rb") as f:
            return read_spool(f)
    inputs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    ids: list[str] = []
    start = source.tell()
    size = source.seek(0, os.SEEK_END)
    source.seek(start)
    while source.tell() < size:
        x = np.load(source, allow_pickle=False)
        y = np.load(source, allow_pickle=False)
        s = np.load(source, allow_pickle=False)
        inputs.append(x)
        labels.append(y)
        ids.extend(str(v) for v in s)
    if not inputs:
        raise ValueError("the spool is empty")
    return np.concatenate(inputs), np.concatenate(labels), ids
