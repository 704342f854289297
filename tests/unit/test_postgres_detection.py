"""Which PostgreSQL the PostgreSQL variants use: set and unusable fails, unset and absent skips."""

from __future__ import annotations

import socket
import time

import pytest

from tests.databases import (
    LOCAL_POSTGRES_URL,
    TEST_DATABASE_URL_ENV,
    PostgresProbe,
    postgres_admin_url,
    probe_postgres,
)

CONFIGURED = "postgresql+psycopg://ci:secret@db.example:5432/test"


class FixedProbe:
    """A named fake probe: every URL gets the same answer; records what it was asked."""

    def __init__(self, problem: str | None) -> None:
        self.problem = problem
        self.urls: list[str] = []

    def __call__(self, url: str) -> PostgresProbe:
        self.urls.append(url)
        return PostgresProbe(url, self.problem)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


def test_a_closed_port_is_unavailable_quickly() -> None:
    started = time.monotonic()
    found = probe_postgres(f"postgresql+psycopg://postgres@127.0.0.1:{_closed_port()}/test")
    assert not found.available
    assert found.problem is not None and "does not answer" in found.problem
    assert time.monotonic() - started < 5


def test_a_malformed_url_is_unavailable_not_an_error() -> None:
    assert not probe_postgres("not a url").available


def test_set_and_answering_is_used() -> None:
    probe = FixedProbe(None)
    assert postgres_admin_url({TEST_DATABASE_URL_ENV: CONFIGURED}, probe) == CONFIGURED
    assert probe.urls == [CONFIGURED]


def test_set_but_not_answering_fails_and_hides_the_password() -> None:
    with pytest.raises(pytest.fail.Exception) as failed:
        postgres_admin_url({TEST_DATABASE_URL_ENV: CONFIGURED}, FixedProbe("does not answer (refused)"))
    message = str(failed.value)
    assert TEST_DATABASE_URL_ENV in message and "does not answer (refused)" in message
    assert "secret" not in message and "ci:***@db.example" in message


def test_set_but_without_create_database_fails() -> None:
    with pytest.raises(pytest.fail.Exception, match="cannot CREATE DATABASE"):
        postgres_admin_url(
            {TEST_DATABASE_URL_ENV: CONFIGURED}, FixedProbe("answers, but its account cannot CREATE DATABASE")
        )


def test_unset_uses_a_local_postgresql_that_answers() -> None:
    probe = FixedProbe(None)
    assert postgres_admin_url({}, probe) == LOCAL_POSTGRES_URL
    assert postgres_admin_url({TEST_DATABASE_URL_ENV: ""}, probe) == LOCAL_POSTGRES_URL  # empty = unset
    assert probe.urls == [LOCAL_POSTGRES_URL, LOCAL_POSTGRES_URL]


def test_unset_without_a_local_postgresql_skips_naming_the_variable() -> None:
    with pytest.raises(pytest.skip.Exception) as skipped:
        postgres_admin_url({}, FixedProbe("does not answer (refused)"))
    assert TEST_DATABASE_URL_ENV in str(skipped.value) and LOCAL_POSTGRES_URL in str(skipped.value)
