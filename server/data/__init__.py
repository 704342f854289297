"""Data the server keeps: the blob store (spools, probe sets, retained data, checkpoints), purges."""

from server.data.blobs import BlobStore, BlobWriter, FileBlobStore, open_blob_store
from server.data.files import (
    FileRecord,
    digest_on_disk,
    fsync_dir,
    load_arrays,
    purge,
    save_arrays,
    sha256_file,
    write_atomic,
)
from server.data.spool import SpoolWriter, read_spool

__all__ = [
    "BlobStore",
    "BlobWriter",
    "FileBlobStore",
    "FileRecord",
    "SpoolWriter",
    "digest_on_disk",
    "fsync_dir",
    "load_arrays",
    "open_blob_store",
    "purge",
    "read_spool",
    "save_arrays",
    "sha256_file",
    "write_atomic",
]
