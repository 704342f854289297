"""Files the server keeps under its data directory: spools, probe sets, retained data, purges."""

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
    "FileRecord",
    "SpoolWriter",
    "digest_on_disk",
    "fsync_dir",
    "load_arrays",
    "purge",
    "read_spool",
    "save_arrays",
    "sha256_file",
    "write_atomic",
]
