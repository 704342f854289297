"""Database fixtures: every database test runs on SQLite and on PostgreSQL.

The PostgreSQL variant uses ``LETHE_TEST_DATABASE_URL`` when it is set (and fails when that does
not answer), otherwise a local PostgreSQL if one answers, otherwise it is skipped; see
:mod:`tests.databases`. Each test gets a fresh database, dropped after.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from server.storage import make_engine, make_session_factory, upgrade
from tests.databases import describe_postgres, fresh_postgres_database, postgres_admin_url


def pytest_report_header(config: pytest.Config) -> str:
    """Says in the run's header which PostgreSQL the PostgreSQL variants use, or why they are skipped."""
    return describe_postgres()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the PostgreSQL variant of every ``slow_on_postgres`` test ``slow``.

    The default suite must finish within CI's 30 minutes: the longest end-to-end tests (tens of
    seconds of training each) run there on SQLite only, and on both databases in ``make test-slow``.
    The PostgreSQL code paths they cross (jobs, leases, purges, the audit chain) are covered in the
    default suite by the shorter tests that run on both. Runs before ``-m`` selects (``tryfirst``).
    """
    for item in items:
        callspec = getattr(item, "callspec", None)
        if (
            item.get_closest_marker("slow_on_postgres") is not None
            and callspec is not None
            and callspec.params.get("database_url") == "postgresql"
        ):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, empty database: a SQLite file under ``tmp_path``, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'lethe.db'}"
        return
    yield from fresh_postgres_database(postgres_admin_url())


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
