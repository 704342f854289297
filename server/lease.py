"""One writer per database (DESIGN.md section 9): the primary's lease, a hot standby, fencing.

Two servers that both trained and committed on one job queue would diverge, so only the holder of
the lease writes:

* **SQLite**: an exclusive ``flock`` on ``lethe.lock`` in the data directory for the life of the
  process. A second server on the same data directory cannot take it and exits, naming the holder.
* **PostgreSQL**: a session-level advisory lock held on a connection of its own, and the
  ``leases`` row it guards. Taking the lease bumps the row's ``epoch`` (the fencing token) and
  records the lease connection; the holder renews the row every ``ttl / 3`` seconds. A second
  server waits as a hot standby, trying every second. A primary that dies loses its connection and
  with it the lock at once; one that stops renewing (paused, partitioned) for ``ttl`` seconds has
  its lease connection ended by the standby. Fencing: every transaction of the primary checks,
  just before it commits, that the row still carries its epoch (``FOR SHARE``: a takeover waits for
  such a commit, and no commit passes after it), so a primary that lost the lease can never commit.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from server.errors import UnavailableError

log = logging.getLogger(__name__)

#: The lease row's name and the advisory lock's key (``'leth'``).
LEASE_NAME = "primary"
ADVISORY_KEY = 0x6C657468
#: The lock file of a SQLite server, in its data directory.
LOCK_FILE = "lethe.lock"
#: The health service only a serving primary reports SERVING (clients and Kubernetes find the writer by it).
PRIMARY_SERVICE = "lethe.primary"
#: PostgreSQL: the channel the primary notifies at every commit (replicas listen to it).
CHANGES_CHANNEL = "lethe_changes"
#: Seconds between a standby's attempts to take the lease.
STANDBY_POLL_SECONDS = 1.0


class LeaseHeldError(RuntimeError):
    """SQLite: another server holds the data directory's lock file."""


class NotPrimaryError(UnavailableError):
    """This server does not hold the lease: it must not write."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="NOT_PRIMARY", retry_after=1.0)


def this_process() -> str:
    """How a lease names its holder: host and process id."""
    return f"{socket.gethostname()} pid {os.getpid()}"


class Lease(Protocol):
    """The right to write. ``epoch`` is 0 until it is taken."""

    epoch: int

    def try_acquire(self) -> bool:
        """Take the lease if it is free (or, PostgreSQL, its holder stopped renewing); True if held now."""
        ...

    def renew(self) -> bool | None:
        """Keep the lease: True if kept, False once it is lost, None when that cannot be told now."""
        ...

    def holder(self) -> str:
        """Who holds the lease, in words (for logs and errors)."""
        ...

    def fence(self, session: Session) -> None:
        """Raise :class:`NotPrimaryError` unless this server still holds the lease (before a commit)."""
        ...

    def release(self) -> None:
        """Give the lease up (at a graceful stop)."""
        ...


class FileLease:
    """SQLite: an exclusive lock on the data directory's ``lethe.lock``, held until the process ends."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self.epoch = 0
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Lock the file (never blocks); on success write who holds it into it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{this_process()}\n".encode())
        self._fd, self.epoch = fd, 1
        return True

    def renew(self) -> bool | None:
        """A lock on a file is held until released or the process ends."""
        return self._fd is not None

    def holder(self) -> str:
        """The holder written into the file."""
        try:
            return self.path.read_text().strip() or "another process"
        except OSError:
            return "another process"

    def fence(self, session: Session) -> None:
        """Nothing can take the lock while this process lives; refuse only if it was never taken."""
        if self._fd is None:
            raise NotPrimaryError(f"this server does not hold {self.path}")

    def release(self) -> None:
        """Unlock and close the file (it stays, empty of meaning, for the next server)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd, self.epoch = None, 0


class PostgresLease:
    """PostgreSQL: the advisory lock on a connection of its own, and the ``leases`` row (see the module doc).

    Args:
        engine: the server's engine (the lease connection is one more of its connections).
        ttl_seconds: how long a holder may go without renewing before a standby ends its lease.
    """

    def __init__(self, engine: Engine, ttl_seconds: float) -> None:
        self.engine = engine
        self.ttl = ttl_seconds
        self.epoch = 0
        self.me = this_process()
        self._connection: Connection | None = None
        self._backend_pid = 0
        self._lock = threading.Lock()

    def _lease_connection(self) -> Connection:
        if self._connection is None or self._connection.closed or self._connection.invalidated:
            self._connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self._connection

    def try_acquire(self) -> bool:
        """The advisory lock, then a new epoch in the row; else end a stale holder's lease connection."""
        with self._lock:
            connection = self._lease_connection()
            if not connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": ADVISORY_KEY}).scalar():
                self._end_stale_holder(connection)
                return False
            self._backend_pid = int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())
            self.epoch = int(
                connection.execute(
                    text(
                        "INSERT INTO leases (name, epoch, holder, backend_pid, renewed_at) "
                        "VALUES (:name, 1, :me, pg_backend_pid(), clock_timestamp()) "
                        "ON CONFLICT (name) DO UPDATE SET epoch = leases.epoch + 1, holder = :me, "
                        "backend_pid = pg_backend_pid(), renewed_at = clock_timestamp() RETURNING epoch"
                    ),
                    {"name": LEASE_NAME, "me": self.me},
                ).scalar_one()
            )
            return True

    def _end_stale_holder(self, connection: Connection) -> None:
        row = connection.execute(
            text(
                "SELECT l.holder, l.epoch, l.backend_pid, EXTRACT(EPOCH FROM clock_timestamp() - l.renewed_at), "
                "a.application_name FROM leases l LEFT JOIN pg_stat_activity a ON a.pid = l.backend_pid "
                "WHERE l.name = :name"
            ),
            {"name": LEASE_NAME},
        ).one_or_none()
        if row is None or row[2] is None or float(row[3]) <= self.ttl:
            return
        log.warning(
            "the primary (%s, epoch %d) has not renewed its lease for %.1f s (ttl %.1f s): ending its lease "
            "connection so that this standby can take over",
            row[0],
            row[1],
            float(row[3]),
            self.ttl,
        )
        # Its other sessions too: a transaction it was committing holds the row FOR SHARE and would
        # block the takeover for as long as it stays paused. Ended, it commits nothing.
        connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE (pid = :pid OR application_name = :app) AND pid <> pg_backend_pid()"
            ),
            {"pid": int(row[2]), "app": row[4]},
        )

    def renew(self) -> bool | None:
        """Touch the row under this epoch; True if renewed, False if lost, None if the database is away.

        A lease connection that broke (a database restart, a network blip) is replaced: the lock is
        taken again on a new connection, and the lease is still ours only if the row still carries
        our epoch (no standby took over meanwhile).
        """
        with self._lock:
            if self.epoch == 0:
                return False
            try:
                connection = self._lease_connection()
                pid = int(connection.execute(text("SELECT pg_backend_pid()")).scalar_one())
                lock = text("SELECT pg_try_advisory_lock(:key)")
                if pid != self._backend_pid and not connection.execute(lock, {"key": ADVISORY_KEY}).scalar():
                    return False  # reconnected, and another server holds the lock now
                renewed = connection.execute(
                    text(
                        "UPDATE leases SET renewed_at = clock_timestamp(), backend_pid = pg_backend_pid() "
                        "WHERE name = :name AND epoch = :epoch"
                    ),
                    {"name": LEASE_NAME, "epoch": self.epoch},
                ).rowcount
            except Exception as exc:  # the database is away: the fence keeps every commit safe meanwhile
                log.warning("could not renew the lease (%s); trying again", exc)
                self._drop_connection()
                return None
            if renewed != 1:
                return False
            self._backend_pid = pid
            return True

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close cleanly
                connection.close()

    def holder(self) -> str:
        """The holder and epoch the row names."""
        with self.engine.connect() as connection:
            row = connection.execute(
                text("SELECT holder, epoch FROM leases WHERE name = :name"), {"name": LEASE_NAME}
            ).one_or_none()
        return f"{row[0]} (epoch {row[1]})" if row is not None else "nobody yet"

    def fence(self, session: Session) -> None:
        """The row must still carry this server's epoch; locks it ``FOR SHARE`` until the commit."""
        current = session.execute(
            text("SELECT epoch FROM leases WHERE name = :name FOR SHARE"), {"name": LEASE_NAME}
        ).scalar_one_or_none()
        if self.epoch == 0 or current != self.epoch:
            raise NotPrimaryError(
                f"this server lost the primary lease (its epoch {self.epoch}, the database's {current}): "
                "it may no longer write"
            )

    def release(self) -> None:
        """Unlock and close the lease connection (a standby takes over within a second)."""
        with self._lock:
            connection, self._connection = self._connection, None
            self.epoch = 0
        if connection is not None and not connection.closed:
            try:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_KEY})
            except Exception as exc:  # closing the connection releases it all the same
                log.warning("could not release the lease cleanly (%s)", exc)
            with contextlib.suppress(Exception):
                connection.close()


def lease_for(engine: Engine, data_dir: Path, ttl_seconds: float) -> Lease:
    """The lease of a server on ``engine``: PostgreSQL's, or the data directory's lock file for SQLite."""
    if engine.dialect.name == "postgresql":
        return PostgresLease(engine, ttl_seconds)
    return FileLease(data_dir)


def fence_commits(sessions: sessionmaker[Session], lease: Lease) -> None:
    """Check the lease just before every commit of ``sessions`` (see :meth:`Lease.fence`); on PostgreSQL
    also notify :data:`CHANGES_CHANNEL`, delivered to replicas when (and only if) the commit happens."""

    def before_commit(session: Session) -> None:
        lease.fence(session)
        if isinstance(lease, PostgresLease):
            session.execute(text(f"NOTIFY {CHANGES_CHANNEL}"))

    event.listen(sessions, "before_commit", before_commit)


class LeaseKeeper:
    """Renews a held lease every ``ttl / 3`` seconds in a thread; calls ``on_lost`` once if it is lost
    (not while the database is merely away: commits are fenced meanwhile)."""

    def __init__(self, lease: Lease, ttl_seconds: float, on_lost: Callable[[], None]) -> None:
        self.lease = lease
        self.interval = ttl_seconds / 3.0
        self.on_lost = on_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lethe-lease", daemon=True)

    def start(self) -> None:
        """Start renewing."""
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                kept = self.lease.renew()
            except Exception:  # never let renewal die silently: try again (commits stay fenced)
                log.exception("renewing the lease failed; trying again")
                kept = None
            if kept is False:  # None: the database is away; try again
                if not self._stop.is_set():
                    self.on_lost()
                return

    def stop(self) -> None:
        """Stop renewing (the lease is released by its owner)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)
