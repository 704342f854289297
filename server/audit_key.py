"""The server's Ed25519 audit key: loaded from its PEM file, created on first start.

The key signs every audit event, the chain head and forgetting certificates (see
:mod:`protos.audit_signing`). It is created with mode 0600 in a 0700 directory; its public key is
written next to the data as ``<data_dir>/keys/audit-ed25519.pub`` for operators to hand out
(``lethe audit public-key`` fetches the same over gRPC).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from protos.audit_signing import AuditSigningKey
from server.data import fsync_dir, write_atomic

log = logging.getLogger(__name__)

#: Where the public key is written, relative to the data directory.
PUBLIC_KEY_FILE = "keys/audit-ed25519.pub"


def load_or_create_audit_key(path: Path, *, create: bool) -> AuditSigningKey:
    """Load the audit signing key from ``path``, or create it there (mode 0600) when allowed.

    Args:
        path: The PEM file (PKCS#8, unencrypted Ed25519).
        create: Create a new key when the file does not exist (the default location); a configured
            file must exist, since a new key would silently stop old signatures from verifying.

    Raises:
        FileNotFoundError: The file does not exist and ``create`` is false.
        ValueError: The file is not an unencrypted Ed25519 PEM private key.
    """
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("the audit signing key %s is readable by others (mode %o); chmod 600 it", path, mode)
        try:
            return AuditSigningKey.from_pem(path.read_bytes())
        except ValueError as error:
            raise ValueError(f"audit signing key {path}: {error}") from None
    if not create:
        raise FileNotFoundError(f"audit signing key {path} does not exist")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = AuditSigningKey.generate()
    tmp = path.with_name(path.name + ".tmp")
    # Created 0600 from the start (no window in which another user could read it).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key.private_pem())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    log.warning(
        "created the audit signing key %s (public key fingerprint %s); back it up with the database",
        path,
        key.public_key.fingerprint,
    )
    return key


def write_public_key(data_dir: Path, key: AuditSigningKey) -> Path:
    """Write (or refresh) ``<data_dir>/keys/audit-ed25519.pub``; return its path."""
    path = data_dir / PUBLIC_KEY_FILE
    pem = key.public_key.pem.encode()
    if not path.exists() or path.read_bytes() != pem:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, pem)
    return path
