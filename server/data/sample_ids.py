"""Sample ids as keyed digests: how the server names a client's samples without storing the ids.

A client names each sample of a Learn stream (``SampleChunk.sample_ids``) so that it can later ask
for that sample to be forgotten. The server never stores the id itself: SQL, spool and data files
hold HMAC-SHA-256 of the id under a server-side key (32 random bytes in a file, mode 0600). Without
the key a digest cannot be linked back to a guessable id (an e-mail address, a customer number).

Streams sent without ids get server-made ones, ``<learn job id>/<index>`` (0-based stream order),
returned on the Job as ``sample_id_prefix``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path

#: Bytes of a newly created key.
KEY_BYTES = 32


def server_made_id(job_id: str, index: int) -> str:
    """The id of sample ``index`` (0-based) of a Learn stream that carried none."""
    return f"{job_id}/{index}"


class SampleIdKey:
    """The server's sample-id key, loaded from (or created at) ``path``.

    Every server that must recognise the same ids (a restarted one, a standby, a server restored
    from backup) needs the same key file: losing it makes every indexed sample unfindable.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: bytes | None = None
        self._lock = threading.Lock()

    def _secret(self) -> bytes:
        """The key, read (or created) on first use: a server that never indexes writes no key file."""
        with self._lock:
            if self._key is None:
                self._key = _load_or_create(self.path)
            return self._key

    def digest(self, sample_id: str) -> str:
        """HMAC-SHA-256 of ``sample_id`` under the key, hex (64 characters)."""
        return hmac.new(self._secret(), sample_id.encode("utf-8"), hashlib.sha256).hexdigest()

    def digests(self, sample_ids: Iterable[str]) -> list[str]:
        """:meth:`digest` of each id, in order."""
        template = hmac.new(self._secret(), digestmod=hashlib.sha256)
        found = []
        for sample_id in sample_ids:
            mac = template.copy()
            mac.update(sample_id.encode("utf-8"))
            found.append(mac.hexdigest())
        return found

    def server_made(self, job_id: str, count: int) -> list[str]:
        """Digests of the server-made ids of a stream of ``count`` samples without ids."""
        return self.digests(server_made_id(job_id, i) for i in range(count))


def _load_or_create(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = secrets.token_bytes(KEY_BYTES)
        try:  # O_EXCL: two processes starting at once agree on one key
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return _load_or_create(path)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
            f.flush()
            os.fsync(f.fileno())
    if len(key) < 16:
        raise ValueError(f"sample-id key file {path} holds {len(key)} bytes; it needs at least 16 (32 when created)")
    return key
