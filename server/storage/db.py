"""Engines, sessions and the schema version: everything between a URL and a usable database.

The server owns its schema: :func:`upgrade` runs the Alembic migrations in ``migrations/`` (what
``lethe db upgrade`` calls) and :func:`check_schema` refuses a database at any other revision than
the one this code was written for.
"""

from __future__ import annotations

import json
import os
import socket
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

from server.storage.urls import mask_url, normalize_url

#: Environment variable that overrides where the migration scripts are found.
MIGRATIONS_DIR_ENV = "LETHE_MIGRATIONS_DIR"
#: ``config.attributes`` key through which :func:`upgrade` hands its URL to ``migrations/env.py``.
DATABASE_URL_ATTRIBUTE = "database_url"
#: Distribution name, used to find the source tree of an installed (editable) checkout.
DISTRIBUTION = "lethe"
#: SQLite busy timeout: how long a writer waits for the write lock before failing.
SQLITE_BUSY_TIMEOUT_MS = 30_000


class SchemaError(RuntimeError):
    """The database is not at the schema revision this code expects.

    Attributes:
        current: The database's revision, ``None`` for an empty database.
        expected: The revision this code needs (the migrations' head).
        command: The command that upgrades the database (password masked).
    """

    def __init__(self, message: str, *, current: str | None, expected: str, command: str) -> None:
        super().__init__(message)
        self.current = current
        self.expected = expected
        self.command = command


def make_engine(url: str | URL, *, echo: bool = False) -> Engine:
    """Creates an engine for SQLite or PostgreSQL, configured for a long-running multi-threaded server.

    SQLite: WAL journal (plain reads, e.g. a backup or the ``sqlite3`` shell, do not block the
    server), ``foreign_keys=ON``, a 30 s busy timeout, and every transaction starts with
    ``BEGIN IMMEDIATE`` so it takes the write lock up front: two transactions that read then write
    can never deadlock on the lock upgrade (or lose an update), they queue. The cost: the server's
    own transactions, read-only ones included, run one at a time, so keep them short. The parent
    directory of the database file is created.

    PostgreSQL: ``postgres://`` and ``postgresql://`` URLs use the psycopg 3 driver.

    Both use ``pool_pre_ping`` so connections dropped by a database restart are replaced.

    Args:
        url: SQLAlchemy database URL.
        echo: Log every SQL statement (debugging).

    Returns:
        A new engine; the caller disposes of it.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        # Named after this process, so a standby can end every session of a primary that stopped
        # renewing its lease (server.lease), not only its lease connection.
        name = application_name()
        return create_engine(parsed, pool_pre_ping=True, echo=echo, connect_args={"application_name": name})
    database_file = _sqlite_file(parsed)
    if database_file is not None:
        database_file.parent.mkdir(parents=True, exist_ok=True)
        parsed = parsed.set(database=str(database_file))  # with ~ expanded, as sqlite3 will not
    engine = create_engine(
        parsed,
        pool_pre_ping=True,
        echo=echo,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
    )
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_immediate)
    return engine


def application_name() -> str:
    """How this process names its PostgreSQL sessions: ``lethe <host> pid <pid>`` (at most 63 bytes)."""
    return f"lethe {socket.gethostname()} pid {os.getpid()}"[:63]


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Returns the session factory the server uses: ``expire_on_commit=False``.

    Objects stay readable after the transaction that loaded them commits (the servicer converts
    them to protos after committing).

    Args:
        engine: The engine sessions connect with.
    """
    return sessionmaker(bind=engine, expire_on_commit=False)


def migrations_dir() -> Path:
    """Finds the ``migrations/`` folder (Alembic's script location).

    Looked up, in order: ``$LETHE_MIGRATIONS_DIR``; next to the ``server`` package (a source
    checkout or an editable install, ``pip install -e .``); the source tree recorded by pip in the
    installed distribution's ``direct_url.json``.

    Raises:
        FileNotFoundError: If none of them holds ``env.py``.
    """
    candidates: list[Path] = []
    override = os.environ.get(MIGRATIONS_DIR_ENV)
    if override:
        candidates.append(Path(override))
    candidates.append(Path(__file__).resolve().parents[2] / "migrations")
    source_tree = _installed_source_tree()
    if source_tree is not None:
        candidates.append(source_tree / "migrations")
    for candidate in candidates:
        if (candidate / "env.py").is_file():
            return candidate
    tried = ", ".join(str(candidate) for candidate in candidates)
    raise FileNotFoundError(f"Alembic migrations not found (tried {tried}); set {MIGRATIONS_DIR_ENV}")


def alembic_config(url: str | URL | None = None) -> Config:
    """Builds an Alembic config for the ``migrations/`` folder without reading ``alembic.ini``.

    Args:
        url: Database to migrate; ``migrations/env.py`` reads it from ``config.attributes``.
            Without it, env.py falls back to ``$LETHE_DATABASE_URL``.

    Returns:
        A config usable with :mod:`alembic.command`.
    """
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()).replace("%", "%%"))
    if url is not None:
        config.attributes[DATABASE_URL_ATTRIBUTE] = _unmasked(url)
    return config


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrates the database at ``url`` to ``revision`` (what ``lethe db upgrade`` runs).

    Works from any working directory. Creates the schema in an empty database. Safe to run again:
    a database already at ``revision`` is left as is. All pending migrations run in one
    transaction, on SQLite too: an upgrade that fails changes nothing.

    Args:
        url: SQLAlchemy database URL.
        revision: Target Alembic revision.
    """
    command.upgrade(alembic_config(url), revision)


def current_revision(engine: Engine) -> str | None:
    """Returns the database's Alembic revision, or ``None`` when it has never been migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    """Returns the newest revision of the migrations shipped with this code."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations in {migrations_dir()}")
    return head


def check_schema(engine: Engine) -> None:
    """Refuses to proceed unless the database is exactly at :func:`head_revision`.

    The server calls this before it reports ready; it never migrates on its own.

    Args:
        engine: The server's engine.

    Raises:
        SchemaError: If the database is empty, older, or at a revision this code does not know;
            the message names both revisions and the command that fixes it.
    """
    current = current_revision(engine)
    expected = head_revision()
    if current == expected:
        return
    fix = f"lethe db upgrade --database-url {mask_url(engine.url)}"
    if current is None:
        message = (
            f"the database has no Lethe schema (empty, revision none); this server needs revision {expected}. "
            f"Create it with: {fix}"
        )
    elif _is_known_revision(current):
        message = (
            f"the database schema is at revision {current}, older than the revision {expected} this server needs. "
            f"Upgrade it with: {fix}"
        )
    else:
        message = (
            f"the database schema is at revision {current}, which this version of Lethe does not know "
            f"(written by a newer release?); this server needs revision {expected}. Run the Lethe release "
            f"that wrote it, or upgrade Lethe and then run: {fix}"
        )
    raise SchemaError(message, current=current, expected=expected, command=fix)


def _is_known_revision(revision: str) -> bool:
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except CommandError:
        return False


def _unmasked(url: str | URL) -> str:
    return url.render_as_string(hide_password=False) if isinstance(url, URL) else url


def _installed_source_tree() -> Path | None:
    """The local source directory pip recorded when installing Lethe from a path (PEP 610)."""
    # Several metadata copies may be visible (an in-tree lethe.egg-info next to the installed
    # dist-info); only the installed one records where it came from.
    for distribution in metadata.distributions(name=DISTRIBUTION):
        raw = distribution.read_text("direct_url.json")
        if not raw:
            continue
        location = urlparse(json.loads(raw).get("url", ""))
        if location.scheme == "file":
            return Path(unquote(location.path))
    return None


def _sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL, ``None`` for in-memory and ``file:`` URI databases."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:") or url.query.get("mode") == "memory":
        return None
    return Path(database).expanduser()


def _configure_sqlite_connection(dbapi_connection: Any, connection_record: Any) -> None:
    # Take transaction control away from the sqlite3 module (it would emit a deferred BEGIN
    # lazily); _begin_immediate emits our own.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
    finally:
        cursor.close()


def _begin_immediate(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")
