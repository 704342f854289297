"""Engine setup, URLs, schema checks and datetime round trips."""

from __future__ import annotations

import shutil
import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, make_url, text
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.orm import Session, sessionmaker

from server.storage import (
    SchemaError,
    Task,
    TaskState,
    check_schema,
    current_revision,
    head_revision,
    make_engine,
    make_session_factory,
    mask_url,
    normalize_url,
    upgrade,
)
from server.storage.db import MIGRATIONS_DIR_ENV, migrations_dir

#: For behaviour decided in Python before any SQL runs: one backend is enough.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

#: ``HEAD`` is replaced by the project's newest revision, so the test revisions always follow it.
REVISION_FOLLOW_UP = '''"""Test-only follow-up revision."""

import sqlalchemy as sa
from alembic import op

revision = "9001"
down_revision = "HEAD"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("step_one", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    pass
'''

BROKEN_REVISION = '''"""Test-only revision that fails half-way."""

import sqlalchemy as sa
from alembic import op

revision = "9002"
down_revision = "9001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("half_done", sa.Column("id", sa.Integer(), primary_key=True))
    op.execute("INSERT INTO no_such_table VALUES (1)")


def downgrade() -> None:
    pass
'''


def test_normalize_url_selects_psycopg_for_plain_postgresql_urls() -> None:
    assert normalize_url("postgres://u:p@db:5432/lethe").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql://u:p@db/lethe").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@db/lethe").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


def test_mask_url_hides_only_the_password() -> None:
    assert mask_url("postgresql://alice:s3cret@db:5432/lethe") == "postgresql://alice:***@db:5432/lethe"
    assert mask_url("sqlite:////var/lethe/lethe.db") == "sqlite:////var/lethe/lethe.db"
    # Not a URL SQLAlchemy can parse: still masked.
    assert "s3cret" not in mask_url("not a url://alice:s3cret@db/x")


def test_sqlite_engine_uses_wal_foreign_keys_and_busy_timeout(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a' / 'b' / 'lethe.db'}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert (tmp_path / "a" / "b" / "lethe.db").is_file()
    finally:
        engine.dispose()


def test_sqlite_transactions_take_the_write_lock_at_begin(tmp_path: Path) -> None:
    path = tmp_path / "lethe.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")  # autobegins: BEGIN IMMEDIATE, nothing written yet
            other = sqlite3.connect(path, timeout=0.05, isolation_level=None)
            try:
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
                connection.rollback()
                other.execute("BEGIN IMMEDIATE")  # free again once the transaction ended
                other.execute("ROLLBACK")
            finally:
                other.close()
    finally:
        engine.dispose()


def test_sqlite_read_modify_write_transactions_never_lose_updates(tmp_path: Path) -> None:
    # With deferred BEGIN two transactions could both read 0 and one would then fail to upgrade
    # its lock; BEGIN IMMEDIATE makes them queue instead.
    url = f"sqlite:///{tmp_path / 'lethe.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        session.add(Task(name="counter", state=TaskState.LEARNED, samples=0))
    errors: list[BaseException] = []

    def increment() -> None:
        try:
            for _ in range(10):
                with sessions.begin() as session:
                    task = session.get(Task, "counter")
                    assert task is not None
                    task.samples += 1
        except BaseException as error:  # collected and re-raised in the test thread
            errors.append(error)

    threads = [threading.Thread(target=increment) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        with sessions() as session:
            task = session.get(Task, "counter")
            assert task is not None
            assert task.samples == 80
    finally:
        engine.dispose()


def test_check_schema_accepts_a_migrated_database(db_engine: Engine) -> None:
    check_schema(db_engine)


def test_check_schema_refuses_an_empty_database(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with pytest.raises(SchemaError) as raised:
            check_schema(engine)
    finally:
        engine.dispose()
    message = str(raised.value)
    assert "revision none" in message
    assert head_revision() in message
    assert f"lethe db upgrade --database-url {mask_url(engine.url)}" in message
    assert raised.value.current is None
    assert raised.value.expected == head_revision()


def _newer_migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A copy of the migrations with the test revision 9001 after the project's head; returns it and that head."""
    head = head_revision()
    newer = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), newer, ignore=shutil.ignore_patterns("__pycache__"))
    (newer / "versions" / "9001_follow_up.py").write_text(REVISION_FOLLOW_UP.replace('"HEAD"', repr(head)))
    monkeypatch.setenv(MIGRATIONS_DIR_ENV, str(newer))
    return newer, head


def test_check_schema_refuses_an_older_revision_and_upgrade_fixes_it(
    migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, head = _newer_migrations(tmp_path, monkeypatch)
    assert head_revision() == "9001"
    engine = make_engine(migrated_url)
    try:
        with pytest.raises(SchemaError) as raised:
            check_schema(engine)
        message = str(raised.value)
        assert f"revision {head}" in message and "9001" in message and "older" in message
        assert "lethe db upgrade --database-url" in message
        upgrade(migrated_url)
        check_schema(engine)
    finally:
        engine.dispose()


def test_a_failing_upgrade_leaves_the_database_unchanged(
    migrated_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    newer, head = _newer_migrations(tmp_path, monkeypatch)
    (newer / "versions" / "9002_broken.py").write_text(BROKEN_REVISION)
    with pytest.raises(DBAPIError):
        upgrade(migrated_url)
    db_engine = make_engine(migrated_url)
    try:
        # All or nothing: 9001 succeeded but is rolled back with 9002, on both backends.
        assert current_revision(db_engine) == head
        assert not {"step_one", "half_done"} & set(inspect(db_engine).get_table_names())
    finally:
        db_engine.dispose()


def test_check_schema_refuses_an_unknown_revision(db_engine: Engine) -> None:
    with db_engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'ffffffffffff'"))
    with pytest.raises(SchemaError) as raised:
        check_schema(db_engine)
    message = str(raised.value)
    assert "ffffffffffff" in message and "does not know" in message
    assert "lethe db upgrade --database-url" in message


def test_check_schema_message_masks_the_password(database_url: str) -> None:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        pytest.skip("SQLite URLs carry no password")
    if not url.password:
        url = url.set(password="hunter2")  # ignored by trust authentication
    password = str(url.password)
    engine = make_engine(url)
    try:
        with pytest.raises(SchemaError) as raised:
            check_schema(engine)
    finally:
        engine.dispose()
    assert password not in str(raised.value)
    assert password not in raised.value.command
    assert ":***@" in raised.value.command


def test_datetimes_round_trip_as_aware_utc(session_factory: sessionmaker[Session]) -> None:
    created = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    with session_factory.begin() as session:
        session.add(Task(name="t", state=TaskState.LEARNING, created_at=created, updated_at=created))
    with session_factory() as session:
        task = session.get(Task, "t")
        assert task is not None
        assert task.created_at == created
        assert task.created_at.tzinfo is UTC
        assert task.created_at.microsecond == 890123
        assert task.state is TaskState.LEARNING


@SQLITE_ONLY
def test_naive_datetimes_are_refused(session_factory: sessionmaker[Session]) -> None:
    naive = datetime(2026, 1, 1, 12, 0, 0)
    with pytest.raises(StatementError, match="naive datetime"), session_factory.begin() as session:
        session.add(Task(name="t", state=TaskState.LEARNING, created_at=naive, updated_at=naive))
        session.flush()


@SQLITE_ONLY
def test_unknown_enum_values_are_refused_before_sql(session_factory: sessionmaker[Session]) -> None:
    with pytest.raises(StatementError, match="forgotten"), session_factory.begin() as session:
        session.add(Task(name="t", state="forgotten"))
        session.flush()
