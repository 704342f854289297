"""Which PostgreSQL the PostgreSQL variants of the tests use, and fresh databases on it.

Every database test runs on SQLite and on PostgreSQL. The PostgreSQL account comes from one place,
:func:`postgres_admin_url`:

* ``LETHE_TEST_DATABASE_URL`` set: that URL. If it does not answer, or its account cannot
  ``CREATE DATABASE``, the PostgreSQL tests *fail*: a run that was configured for PostgreSQL must
  never go green on SQLite alone.
* unset: :data:`LOCAL_POSTGRES_URL` is tried (a local PostgreSQL with trust authentication). If it
  answers and may create databases, the variants run; otherwise they are skipped, and the reason
  names the variable.

The probe runs once per URL and session (a few milliseconds locally, at most about
:data:`PROBE_TIMEOUT_S` seconds when nothing answers). Each test then gets its own database, created
by :func:`fresh_postgres_database` and dropped after it.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from server.storage import mask_url, normalize_url

#: The environment variable that names the PostgreSQL account of the tests.
TEST_DATABASE_URL_ENV = "LETHE_TEST_DATABASE_URL"
#: Tried when :data:`TEST_DATABASE_URL_ENV` is unset.
LOCAL_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
#: Connect timeout of the probe, in seconds (libpq's smallest: it reads 1 as 2).
PROBE_TIMEOUT_S = 2


@dataclass(frozen=True)
class PostgresProbe:
    """What probing one URL found.

    Attributes:
        url: The URL probed.
        problem: Why the URL cannot serve the tests; ``None`` when it can.
    """

    url: str
    problem: str | None = None

    @property
    def available(self) -> bool:
        """Whether the URL answered and its account may create databases."""
        return self.problem is None


def probe_postgres(url: str, timeout_s: int = PROBE_TIMEOUT_S) -> PostgresProbe:
    """Connect to ``url`` once and check that its account may ``CREATE DATABASE``.

    Args:
        url: A PostgreSQL URL (``postgresql://`` gets the psycopg driver).
        timeout_s: Connect timeout in seconds.

    Returns:
        The probe's finding; never raises.
    """
    try:
        engine = create_engine(normalize_url(url), poolclass=NullPool, connect_args={"connect_timeout": timeout_s})
        try:
            with engine.connect() as connection:
                allowed = connection.execute(
                    text("SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user")
                ).scalar()
        finally:
            engine.dispose()
    except Exception as error:  # whatever stops a connection (refused, auth, bad URL) makes the URL unusable
        cause = getattr(error, "orig", None) or error  # the driver's own message, without SQLAlchemy's wrapping
        lines = str(cause).strip().splitlines()
        return PostgresProbe(url, f"does not answer ({lines[0] if lines else type(cause).__name__})")
    if not allowed:
        return PostgresProbe(url, "answers, but its account cannot CREATE DATABASE")
    return PostgresProbe(url)


@functools.cache
def _probe_once(url: str) -> PostgresProbe:
    return probe_postgres(url)


def postgres_admin_url(
    env: Mapping[str, str] | None = None, probe: Callable[[str], PostgresProbe] = _probe_once
) -> str:
    """The URL of the PostgreSQL account the PostgreSQL tests create their databases with.

    Call it from a fixture or test: it skips or fails the calling test when there is none.

    Args:
        env: The environment; defaults to ``os.environ``.
        probe: Probes a URL; defaults to :func:`probe_postgres`, once per URL and session.

    Returns:
        ``LETHE_TEST_DATABASE_URL`` if set, else :data:`LOCAL_POSTGRES_URL`, once it answered.

    Raises:
        pytest.fail.Exception: ``LETHE_TEST_DATABASE_URL`` is set but unusable.
        pytest.skip.Exception: it is unset and no usable local PostgreSQL answers.
    """
    configured = (os.environ if env is None else env).get(TEST_DATABASE_URL_ENV, "")
    if configured:
        found = probe(configured)
        if not found.available:
            pytest.fail(
                f"{TEST_DATABASE_URL_ENV}={mask_url(configured)} {found.problem}; the PostgreSQL tests cannot run. "
                f"Start that PostgreSQL, or unset {TEST_DATABASE_URL_ENV} to test on a local one if it answers.",
                pytrace=False,
            )
        return configured
    found = probe(LOCAL_POSTGRES_URL)
    if not found.available:
        pytest.skip(
            f"no PostgreSQL: {TEST_DATABASE_URL_ENV} is unset and {LOCAL_POSTGRES_URL} {found.problem}; "
            f"set {TEST_DATABASE_URL_ENV} to an account that may CREATE DATABASE to run the PostgreSQL variant"
        )
    return LOCAL_POSTGRES_URL


def describe_postgres(env: Mapping[str, str] | None = None) -> str:
    """One line for the test run's header: which PostgreSQL the PostgreSQL variants use, or why none."""
    configured = (os.environ if env is None else env).get(TEST_DATABASE_URL_ENV, "")
    found = _probe_once(configured or LOCAL_POSTGRES_URL)
    where = f"{mask_url(found.url)} (from {TEST_DATABASE_URL_ENV})" if configured else f"{found.url} (found locally)"
    if found.available:
        return f"postgresql: {where}"
    if configured:
        return f"postgresql: {where} {found.problem}: the PostgreSQL tests will FAIL"
    return f"postgresql: none ({TEST_DATABASE_URL_ENV} unset, {found.url} {found.problem}): variants skipped"


def fresh_postgres_database(admin_url: str) -> Iterator[str]:
    """Create a uniquely named database, yield its URL, and drop it (closing leftover connections).

    Args:
        admin_url: An account that may create databases, e.g. from :func:`postgres_admin_url`.

    Yields:
        The URL of the new, empty database.
    """
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
