"""The blob store on both backends: files under a directory, and chunked rows in real PostgreSQL."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from server.checkpoints import CheckpointMeta, CheckpointStore
from server.config import ConfigError, load_config
from server.data import SpoolWriter, read_spool
from server.data.blobs import BlobStore, FileBlobStore, open_blob_store
from server.data.blobs.postgres import CHUNK_BYTES, PostgresBlobStore
from server.lease import NotPrimaryError, PostgresLease, fence_commits
from server.storage import Blob, BlobChunk, make_engine, make_session_factory, upgrade
from tests.databases import fresh_postgres_database, postgres_admin_url


@pytest.fixture
def postgres_engine() -> Iterator[Engine]:
    """An engine on a fresh, migrated PostgreSQL database."""
    for url in fresh_postgres_database(postgres_admin_url()):
        upgrade(url)
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


@pytest.fixture(params=["files", pytest.param("postgresql", marks=pytest.mark.postgres)])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """A blob store of each backend."""
    if request.param == "files":
        return FileBlobStore(tmp_path / "blobs")
    engine = request.getfixturevalue("postgres_engine")
    return PostgresBlobStore(make_session_factory(engine))


def _payload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def test_a_written_blob_reads_back_with_its_digest(blobs: BlobStore) -> None:
    data = _payload(2 * CHUNK_BYTES + 12345)
    record = blobs.write("probes/a.npz", data)
    assert (record.path, record.bytes, record.sha256) == ("probes/a.npz", len(data), hashlib.sha256(data).hexdigest())
    assert blobs.exists("probes/a.npz") and not blobs.exists("probes/b.npz")
    assert blobs.read_bytes("probes/a.npz") == data
    assert blobs.digest("probes/a.npz") == record
    assert blobs.digest("probes/b.npz") is None
    assert blobs.names("probes") == ["probes/a.npz"] and blobs.names("spool") == []
    with pytest.raises(FileNotFoundError):
        blobs.open("probes/b.npz")


def test_a_stream_seeks_anywhere(blobs: BlobStore) -> None:
    data = _payload(3 * CHUNK_BYTES + 7, seed=1)
    blobs.write("checkpoints/x.pt", data)
    with blobs.open("checkpoints/x.pt") as f:
        for start, size in ((CHUNK_BYTES - 3, 10), (0, 5), (len(data) - 4, 100), (2 * CHUNK_BYTES, CHUNK_BYTES + 2)):
            f.seek(start)
            assert f.read(size) == data[start : start + size]
            assert f.tell() == min(start + size, len(data))
        assert f.seek(0, io.SEEK_END) == len(data)


def test_an_incremental_write_is_invisible_until_committed(blobs: BlobStore) -> None:
    pieces = [_payload(n, seed=n) for n in (10, CHUNK_BYTES + 5, 3, 2 * CHUNK_BYTES, 0, 1)]
    with blobs.writer("spool/j.spool") as writer:
        for piece in pieces:
            writer.write(memoryview(piece))
        assert writer.written == sum(map(len, pieces))
        assert not blobs.exists("spool/j.spool") and blobs.names("spool") == []
        record = writer.commit()
    whole = b"".join(pieces)
    assert record.sha256 == hashlib.sha256(whole).hexdigest()
    assert blobs.read_bytes("spool/j.spool") == whole


def test_aborted_and_interrupted_writes_leave_nothing_after_the_sweep(blobs: BlobStore) -> None:
    with pytest.raises(RuntimeError), blobs.writer("spool/a.spool") as writer:
        writer.write(_payload(CHUNK_BYTES + 1))
        raise RuntimeError("the client went away")
    assert blobs.remove_temporary("spool") == []  # the abort cleaned up
    crashed = blobs.writer("spool/b.spool")  # a crash: neither committed nor aborted
    crashed.write(_payload(CHUNK_BYTES + 1))
    assert blobs.names("spool") == []
    assert blobs.remove_temporary("probes") == []  # another folder's leftovers are not touched
    assert blobs.remove_temporary("spool") == ["spool/b.spool.partial"]
    assert blobs.remove_temporary("spool") == []
    if isinstance(blobs, PostgresBlobStore):
        with blobs.engine.connect() as connection:
            assert connection.scalar(select(func.count()).select_from(Blob)) == 0
            assert connection.scalar(select(func.count()).select_from(BlobChunk)) == 0


def test_delete_returns_the_digest_of_the_bytes_removed(blobs: BlobStore) -> None:
    data = _payload(CHUNK_BYTES + 99, seed=2)
    blobs.write("retained/r.npz", data)
    removed = blobs.delete("retained/r.npz")
    assert removed is not None and (removed.bytes, removed.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert not blobs.exists("retained/r.npz") and blobs.names("retained") == []
    assert blobs.delete("retained/r.npz") is None  # twice is harmless


def test_the_bytes_actually_removed_are_what_the_digest_says(tmp_path: Path) -> None:
    """A file changed behind the server's back: the purge digest is of the changed bytes."""
    blobs = FileBlobStore(tmp_path)
    recorded = blobs.write("members/m.npz", b"original")
    (tmp_path / "members/m.npz").write_bytes(b"tampered")
    removed = blobs.delete("members/m.npz")
    assert removed is not None and removed.sha256 == hashlib.sha256(b"tampered").hexdigest() != recorded.sha256


def test_writing_a_path_again_replaces_the_blob(blobs: BlobStore) -> None:
    blobs.write("probes/p.npz", b"first")
    blobs.write("probes/p.npz", b"second, longer")
    assert blobs.read_bytes("probes/p.npz") == b"second, longer"
    assert blobs.names("probes") == ["probes/p.npz"]


def test_arrays_spools_and_checkpoints_round_trip(blobs: BlobStore) -> None:
    inputs = np.random.default_rng(3).random((700, 1, 8, 8)).astype(np.float32)
    labels = np.arange(700, dtype=np.int64) % 10
    blobs.save_arrays("probes/p.npz", inputs=inputs, labels=labels)
    loaded = blobs.load_arrays("probes/p.npz")
    assert np.array_equal(loaded["inputs"], inputs) and np.array_equal(loaded["labels"], labels)

    with SpoolWriter(blobs, "spool/s.spool") as spool:
        spool.append(inputs[:300], labels[:300], [f"id{i}" for i in range(300)])
        spool.append(inputs[300:], labels[300:], [f"id{i}" for i in range(300, 700)])
        record = spool.commit()
    assert blobs.digest("spool/s.spool") == record
    with blobs.open("spool/s.spool") as f:
        x, y, ids = read_spool(f)
    assert np.array_equal(x, inputs) and np.array_equal(y, labels) and ids[-1] == "id699"

    store = CheckpointStore(blobs)
    weights = torch.randn(600, 1000)  # ~2.4 MB: three chunks in the database
    store.save(CheckpointMeta(1, "a" * 32, {"loss": 0.5}), {"w": torch.zeros(2)})
    store.save(CheckpointMeta(2, "b" * 32, {}), {"w": weights})
    newest = store.load_latest()
    assert newest is not None and newest.meta.version == 2 and torch.equal(newest.strategy_state["w"], weights)
    removed = store.prune(keep=newest.path)
    assert [r.path for r in removed] == [f"checkpoints/ckpt-0000000001-{'a' * 32}-1.pt"]
    assert store.paths() == [newest.path]


@pytest.mark.postgres
def test_a_primary_that_lost_its_lease_can_neither_publish_nor_delete(postgres_engine: Engine) -> None:
    sessions: sessionmaker[Session] = make_session_factory(postgres_engine)
    lease = PostgresLease(postgres_engine, ttl_seconds=10)
    assert lease.try_acquire()
    fence_commits(sessions, lease)
    blobs = PostgresBlobStore(sessions)
    blobs.write("checkpoints/kept.pt", b"written while primary")
    pending = blobs.writer("checkpoints/late.pt")
    pending.write(b"written while a standby took over")
    with postgres_engine.begin() as connection:  # a standby took over: a new epoch
        connection.execute(text("UPDATE leases SET epoch = epoch + 1"))
    try:
        with pytest.raises(NotPrimaryError):
            pending.commit()
        with pytest.raises(NotPrimaryError):
            blobs.write("checkpoints/new.pt", b"never visible")
        with pytest.raises(NotPrimaryError):
            blobs.delete("checkpoints/kept.pt")
        assert blobs.names("checkpoints") == ["checkpoints/kept.pt"]
        assert blobs.read_bytes("checkpoints/kept.pt") == b"written while primary"
    finally:
        lease.release()


def test_blob_url_is_validated_with_the_database() -> None:
    assert load_config(env={}, overrides={"storage.blob_url": "file:///srv/lethe-blobs"}).storage.blob_url
    url = "postgresql://postgres@127.0.0.1/test"
    assert load_config(env={}, overrides={"storage.blob_url": "postgresql", "storage.database_url": url})
    with pytest.raises(ConfigError, match="is not PostgreSQL"):
        load_config(env={}, overrides={"storage.blob_url": "postgresql"})  # SQLite by default
    for bad in ("s3://bucket/x", "file://relative/path", "/abs/without/scheme"):
        with pytest.raises(ConfigError, match=r"storage\.blob_url"):
            load_config(env={}, overrides={"storage.blob_url": bad})


def test_the_default_store_is_the_data_directory(tmp_path: Path) -> None:
    store = open_blob_store("", tmp_path)
    assert isinstance(store, FileBlobStore) and store.root == tmp_path
    shared = open_blob_store(f"file://{tmp_path / 'shared'}", tmp_path)
    assert isinstance(shared, FileBlobStore) and shared.root == tmp_path / "shared"
    with pytest.raises(ValueError, match="needs the database"):
        open_blob_store("postgresql", tmp_path)
