"""Durable file primitives: atomic writes, fsync of files and directories, hashing, purging."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class FileRecord:
    """A file's identity for accounting and purge proofs. ``path`` is relative to the data directory."""

    path: str
    bytes: int
    sha256: str


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file's contents, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_on_disk(root: Path, relative: str) -> FileRecord | None:
    """Size and SHA-256 of ``root/relative`` as it is now, or None when there is no such file.

    This is what a purge proof records at deletion time: the bytes actually removed, which may
    differ from what was recorded when the file was written.
    """
    path = root / relative
    try:
        size = path.stat().st_size
        return FileRecord(relative, size, sha256_file(path))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def write_atomic(path: Path, payload: bytes) -> str:
    """Write ``payload`` to ``path`` via a temporary file, fsync and rename; return its SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return hashlib.sha256(payload).hexdigest()


def save_arrays(path: Path, **arrays: np.ndarray) -> str:
    """Atomically save arrays as an uncompressed ``.npz`` (no pickled objects); return its SHA-256."""
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    return write_atomic(path, buffer.getvalue())


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Load every array of an ``.npz`` written by :func:`save_arrays`."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def purge(root: Path, relative: str) -> FileRecord | None:
    """Delete ``root/relative`` durably and return what was deleted (None if it was already gone).

    The digest is taken just before deletion, so the audit trail proves which bytes were removed.
    """
    path = root / relative
    try:
        size = path.stat().st_size
        digest = sha256_file(path)
        path.unlink()
    except FileNotFoundError:
        return None
    fsync_dir(path.parent)
    return FileRecord(relative, size, digest)
