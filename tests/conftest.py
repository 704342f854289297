"""Database fixtures: every database test runs on SQLite and, when configured, on PostgreSQL.

PostgreSQL tests need ``LETHE_TEST_DATABASE_URL``, an account allowed to create databases, e.g.
``postgresql+psycopg://postgres@127.0.0.1:5432/test``; each test gets a fresh database, dropped after.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from server.storage import make_engine, make_session_factory, normalize_url, upgrade

TEST_DATABASE_URL_ENV = "LETHE_TEST_DATABASE_URL"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, empty database: a SQLite file under ``tmp_path``, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lethe.db'}"
        return
    admin_url = os.environ.get(TEST_DATABASE_URL_ENV)
    if not admin_url:
        pytest.skip(
            f"{TEST_DATABASE_URL_ENV} is not set; set it to run the PostgreSQL variant, "
            "e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test"
        )
    yield from _fresh_postgres_database(admin_url)


@pytest.fixture
def migrated_url(database_url: str) -> str:
    """:func:`database_url` upgraded to the newest migration."""
    upgrade(database_url)
    return database_url


@pytest.fixture
def db_engine(migrated_url: str) -> Iterator[Engine]:
    """An engine (``make_engine``) on the migrated database, disposed after the test."""
    created = make_engine(migrated_url)
    yield created
    created.dispose()


@pytest.fixture
def session_factory(db_engine: Engine) -> sessionmaker[Session]:
    """The server's session factory on the migrated database."""
    return make_session_factory(db_engine)


def _fresh_postgres_database(admin_url: str) -> Iterator[str]:
    """Creates a uniquely named database, yields its URL, and drops it (closing leftover connections)."""
    admin = normalize_url(admin_url)
    name = f"lethe_test_{uuid.uuid4().hex[:16]}"
    admin_engine = create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin_engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield admin.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin_engine.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin_engine.dispose()
