"""The blob store: spools, probe/member/retained sets and checkpoints, by relative data path.

``storage.blob_url`` chooses the backend (:func:`open_blob_store`): empty = files under the data
directory (as before there was a choice), ``file:///abs/path`` = files under that directory (a
shared volume), ``postgresql`` = chunked rows in the server's PostgreSQL database.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from sqlalchemy.orm import Session, sessionmaker

from server.data.blobs.files import FileBlobStore, FileBlobWriter
from server.data.blobs.store import BlobStore, BlobWriter

#: ``storage.blob_url`` of the database backend (checked by :func:`server.config.validate`).
POSTGRESQL = "postgresql"


def file_root(url: str) -> Path:
    """The directory of a ``file:///abs/path`` blob URL."""
    return Path(unquote(urlparse(url).path))


def open_blob_store(url: str, data_dir: Path, sessions: sessionmaker[Session] | None = None) -> BlobStore:
    """The blob store ``storage.blob_url`` names (see the module doc).

    Args:
        url: ``""``, ``file:///abs/path`` or ``postgresql`` (validated by :func:`blob_url_problem`).
        data_dir: the data directory (the default store's root).
        sessions: the server's sessions (needed for ``postgresql``; its commits are fenced by the lease).

    Raises:
        ValueError: ``postgresql`` without PostgreSQL sessions, or an unknown URL.
    """
    if url == "":
        return FileBlobStore(data_dir)
    if url == POSTGRESQL:
        if sessions is None:
            raise ValueError('storage.blob_url "postgresql" needs the database')
        from server.data.blobs.postgres import PostgresBlobStore  # SQLAlchemy models only when used

        return PostgresBlobStore(sessions)
    parsed = urlparse(url)
    if parsed.scheme != "file" or not parsed.path.startswith("/"):
        raise ValueError(f"storage.blob_url: empty, file:///absolute/path or postgresql, got {url!r}")
    return FileBlobStore(file_root(url))


__all__ = [
    "POSTGRESQL",
    "BlobStore",
    "BlobWriter",
    "FileBlobStore",
    "FileBlobWriter",
    "file_root",
    "open_blob_store",
]
