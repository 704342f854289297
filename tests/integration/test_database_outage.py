"""PostgreSQL going away and coming back while the server runs."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.pool import NullPool

from client import LetheClient, LetheError, pb
from server.storage import normalize_url
from tests.databases import postgres_admin_url
from tests.support import digits, make_config, running_app


def _admin(url: str) -> tuple[Engine, str | None]:
    """An AUTOCOMMIT engine on the tests' PostgreSQL account, and the name of ``url``'s database."""
    admin = normalize_url(postgres_admin_url())
    return create_engine(admin, isolation_level="AUTOCOMMIT", poolclass=NullPool), make_url(url).database


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # the outage is simulated on PostgreSQL
def test_postgres_outage_gives_unavailable_then_recovers(tmp_path: Path, database_url: str) -> None:
    engine, name = _admin(database_url)
    config = make_config(tmp_path / "data", database_url, **{"training.epochs": 2})
    with running_app(config) as server:
        c = server.client
        x, y = digits([0, 1])
        c.wait(c.learn("before", x, y).id)
        with engine.connect() as admin:  # the database goes away: refuse and cut every connection
            admin.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            admin.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
        try:
            assert c.predict("before", x[:8]).classes.shape == (8,)  # serving never touches SQL
            with LetheClient(server.target, retries=1) as once, pytest.raises(LetheError) as down:
                once.learn("during", x, y)
            assert down.value.code == grpc.StatusCode.UNAVAILABLE and "database" in down.value.message
            assert not list((tmp_path / "data" / "spool").glob("*"))  # the spooled stream was removed
        finally:
            with engine.connect() as admin:  # ... and comes back
                admin.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        deadline = time.monotonic() + 30
        while True:
            try:
                job = c.wait(c.learn("after", *digits([2, 3])).id)
                break
            except LetheError as exc:
                if exc.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert job.state == pb.SUCCEEDED
        assert {t.name: t.state for t in c.tasks()} == {"before": pb.LEARNED, "after": pb.LEARNED}
        assert server.app.worker is not None and server.app.worker.alive
    engine.dispose()
