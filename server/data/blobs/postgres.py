"""Blobs in the server's PostgreSQL database: chunked ``bytea`` rows (``storage.blob_url = "postgresql"``).

Tables ``blobs`` and ``blob_chunks`` (migration 0006). Every server on the database (primary,
standby, replicas) reads the same blobs, whatever its data directory, so no shared volume is needed.

* **Write**: a ``blobs`` row is made for the path (``path`` NULL: pending), the bytes go in as
  :data:`CHUNK_BYTES` chunks under its id, each chunk in a short transaction of its own (no
  connection is held between chunks; ``synchronous_commit = off``, since the publishing commit
  after them is durable and WAL order makes them so too); at most one chunk is buffered in memory.
  :meth:`PostgresBlobWriter.commit` publishes in one transaction of the server's (fenced) sessions:
  any blob at the path is deleted and the pending row takes the path, size and SHA-256. A reader
  sees the whole blob or none, and a primary that lost its lease cannot publish (the lease fence of
  :mod:`server.lease` refuses the commit). Pending rows a crash leaves are deleted by
  :meth:`PostgresBlobStore.remove_temporary` (the start-up sweep).
* **Read**: :meth:`PostgresBlobStore.open` returns a seekable stream that fetches the chunk under
  the read position on demand (one chunk in memory, plus the stream's buffer): ``torch.load`` and
  ``np.load`` read a checkpoint or an ``.npz`` straight into their tensors and arrays, one copy,
  with no temporary file (chosen over a ``BytesIO`` or ``SpooledTemporaryFile`` of the whole blob,
  which would hold it twice or put task data on local disk).
* **Delete**: in one (fenced) transaction: the row is locked, its chunks are read and hashed (the
  digest of the bytes actually removed, for the purge proof), and row and chunks are deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterator
from typing import BinaryIO

from sqlalchemy import Connection, Engine, delete, insert, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from server.data.blobs.store import BlobStore, BlobWriter
from server.data.files import FileRecord
from server.storage.column_types import utc_now
from server.storage.models import Blob, BlobChunk

#: Bytes per chunk row.
CHUNK_BYTES = 1 << 20
#: Chunks fetched per query when a blob is read in full (digest, delete).
_BATCH = 8
#: Suffix under which pending blobs are reported (as a file backend names files being written).
PENDING = ".partial"


def _insert_chunk(engine: Engine, blob_id: int, seq: int, data: bytes) -> None:
    with engine.begin() as connection:
        connection.execute(text("SET LOCAL synchronous_commit = off"))
        connection.execute(insert(BlobChunk).values(blob_id=blob_id, seq=seq, data=data))


def _chunks(connection: Connection | Session, blob_id: int) -> Iterator[bytes]:
    """The blob's chunks in order, :data:`_BATCH` per query."""
    seq = 0
    while True:
        rows = connection.execute(
            select(BlobChunk.seq, BlobChunk.data)
            .where(BlobChunk.blob_id == blob_id, BlobChunk.seq >= seq)
            .order_by(BlobChunk.seq)
            .limit(_BATCH)
        ).all()
        for row in rows:
            yield bytes(row.data)
        if len(rows) < _BATCH:
            return
        seq = rows[-1].seq + 1


class PostgresBlobWriter(BlobWriter):
    """Writes one blob as chunk rows under a pending ``blobs`` row (see the module doc)."""

    def __init__(self, store: PostgresBlobStore, relative: str) -> None:
        super().__init__(relative)
        self._store = store
        self._engine = store.engine
        self._digest = hashlib.sha256()
        self._bytes = 0
        self._seq = 0
        self._buffer = bytearray()
        with self._engine.begin() as connection:
            self.blob_id = int(
                connection.execute(
                    insert(Blob)
                    .values(pending_path=relative, bytes=0, sha256="", chunk_bytes=CHUNK_BYTES, created_at=utc_now())
                    .returning(Blob.id)
                ).scalar_one()
            )

    @property
    def written(self) -> int:
        """Bytes written so far."""
        return self._bytes

    def write(self, data: bytes | memoryview) -> int:
        """Hash ``data`` and store every full chunk it completes (the rest waits in a one-chunk buffer)."""
        view = memoryview(data).cast("B")
        size = len(view)
        self._digest.update(view)
        self._bytes += size
        if self._buffer:
            take = min(size, CHUNK_BYTES - len(self._buffer))
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) == CHUNK_BYTES:
                self._put(bytes(self._buffer))
                self._buffer.clear()
        while len(view) >= CHUNK_BYTES:
            self._put(bytes(view[:CHUNK_BYTES]))
            view = view[CHUNK_BYTES:]
        self._buffer += view
        return size

    def _put(self, chunk: bytes) -> None:
        _insert_chunk(self._engine, self.blob_id, self._seq, chunk)
        self._seq += 1

    def commit(self) -> FileRecord:
        """Store the last chunk, then publish the blob in one fenced transaction.

        Raises:
            FileNotFoundError: the pending blob was deleted meanwhile (a new primary's start-up sweep).
        """
        if self._buffer:
            self._put(bytes(self._buffer))
            self._buffer.clear()
        record = FileRecord(self.relative, self._bytes, self._digest.hexdigest())
        with self._store.sessions.begin() as session:
            self._store.delete_rows(session, self.relative)
            published = session.execute(
                update(Blob)
                .where(Blob.id == self.blob_id, Blob.path.is_(None))
                .values(path=self.relative, bytes=record.bytes, sha256=record.sha256)
                .returning(Blob.id)
            ).first()
            if published is None:
                raise FileNotFoundError(f"the pending blob of {self.relative} was deleted before it was published")
        self._done = True
        return record

    def abort(self) -> None:
        """Delete the pending row and its chunks (best effort: the start-up sweep deletes what is left)."""
        self._done = True
        self._buffer.clear()
        with contextlib.suppress(Exception), self._engine.begin() as connection:
            connection.execute(delete(BlobChunk).where(BlobChunk.blob_id == self.blob_id))
            connection.execute(delete(Blob).where(Blob.id == self.blob_id, Blob.path.is_(None)))


class _ChunkReader(io.RawIOBase):
    """A seekable raw stream over a blob's chunks, fetching the chunk under the position on demand."""

    def __init__(self, engine: Engine, relative: str, blob_id: int, size: int, chunk_bytes: int) -> None:
        super().__init__()
        self._engine = engine
        self._relative = relative
        self._blob_id = blob_id
        self._size = size
        self._chunk_bytes = chunk_bytes
        self._pos = 0
        self._seq = -1
        self._chunk = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._pos >= self._size:
            return 0
        seq, offset = divmod(self._pos, self._chunk_bytes)
        if seq != self._seq:
            with self._engine.connect() as connection:
                data = connection.execute(
                    select(BlobChunk.data).where(BlobChunk.blob_id == self._blob_id, BlobChunk.seq == seq)
                ).scalar_one_or_none()
            if data is None:
                raise FileNotFoundError(f"blob {self._relative} was deleted while it was read")
            self._seq, self._chunk = seq, bytes(data)
        target = memoryview(buffer).cast("B")
        n = min(len(target), len(self._chunk) - offset)
        target[:n] = self._chunk[offset : offset + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._chunk = b""
        super().close()


class PostgresBlobStore(BlobStore):
    """Blobs in the database of ``sessions`` (see the module doc).

    Args:
        sessions: the server's sessions; publishing and deleting commit through them, so the
            primary's lease fence applies. Chunks are written and read on their engine directly.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        bind = sessions.kw.get("bind")
        if not isinstance(bind, Engine) or bind.dialect.name != "postgresql":
            raise ValueError("the postgresql blob store needs sessions bound to a PostgreSQL engine")
        self.sessions = sessions
        self.engine: Engine = bind
        self.description = "the database's blobs table"

    def writer(self, relative: str) -> PostgresBlobWriter:
        """A writer of a new blob at ``relative`` (a pending row is made at once)."""
        return PostgresBlobWriter(self, relative)

    def open(self, relative: str) -> BinaryIO:
        """A buffered, seekable stream over the blob's chunks (see :class:`_ChunkReader`)."""
        with self.engine.connect() as connection:
            row = connection.execute(
                select(Blob.id, Blob.bytes, Blob.chunk_bytes).where(Blob.path == relative)
            ).one_or_none()
        if row is None:
            raise FileNotFoundError(f"no blob {relative} in {self.description}")
        raw = _ChunkReader(self.engine, relative, row.id, row.bytes, row.chunk_bytes)
        return io.BufferedReader(raw, buffer_size=min(CHUNK_BYTES, max(row.chunk_bytes, 1)))

    def exists(self, relative: str) -> bool:
        """Whether a published blob is at ``relative``."""
        with self.engine.connect() as connection:
            return connection.execute(select(Blob.id).where(Blob.path == relative)).first() is not None

    def digest(self, relative: str) -> FileRecord | None:
        """Size and SHA-256 of the blob's chunks, read in one repeatable-read transaction."""
        snapshot = self.engine.connect().execution_options(isolation_level="REPEATABLE READ")
        with snapshot as connection, connection.begin():
            found = connection.execute(select(Blob.id).where(Blob.path == relative)).scalar_one_or_none()
            if found is None:
                return None
            return _record(relative, _chunks(connection, found))

    def delete(self, relative: str) -> FileRecord | None:
        """Lock, hash and delete the blob and its chunks in one fenced transaction."""
        with self.sessions.begin() as session:
            return self.delete_rows(session, relative)

    @staticmethod
    def delete_rows(session: Session, relative: str) -> FileRecord | None:
        """Within ``session``'s transaction: delete the blob at ``relative``; return the digest of its bytes."""
        found = session.execute(select(Blob.id).where(Blob.path == relative).with_for_update()).scalar_one_or_none()
        if found is None:
            return None
        record = _record(relative, _chunks(session, found))
        session.execute(delete(BlobChunk).where(BlobChunk.blob_id == found))
        session.execute(delete(Blob).where(Blob.id == found))
        return record

    def names(self, folder: str) -> list[str]:
        """Published blobs directly in ``folder``."""
        prefix = f"{folder}/"
        with self.engine.connect() as connection:
            paths = connection.execute(select(Blob.path).where(Blob.path.startswith(prefix, autoescape=True))).scalars()
            return sorted(p for p in paths if p is not None and "/" not in p[len(prefix) :])

    def remove_temporary(self, folder: str) -> list[str]:
        """Delete pending blobs written for ``folder`` (interrupted writes)."""
        prefix = f"{folder}/"
        with self.engine.begin() as connection:
            pending = connection.execute(
                select(Blob.id, Blob.pending_path).where(
                    Blob.path.is_(None), Blob.pending_path.startswith(prefix, autoescape=True)
                )
            ).all()
            ids = [row.id for row in pending if "/" not in row.pending_path[len(prefix) :]]
            if ids:
                connection.execute(delete(BlobChunk).where(BlobChunk.blob_id.in_(ids)))
                connection.execute(delete(Blob).where(Blob.id.in_(ids)))
        return sorted(row.pending_path + PENDING for row in pending if row.id in ids)


def _record(relative: str, chunks: Iterator[bytes]) -> FileRecord:
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return FileRecord(relative, size, digest.hexdigest())
