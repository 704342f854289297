"""Alembic environment for the Lethe schema.

The database URL comes from, in order: ``config.attributes["database_url"]`` (set by
``server.storage.upgrade``, i.e. ``lethe db upgrade``), ``$LETHE_DATABASE_URL``, or
``sqlalchemy.url`` in ``alembic.ini``. Engines come from ``server.storage.make_engine`` so the
migrations run with the same SQLite pragmas and PostgreSQL driver as the server.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from alembic.config import Config

from server.storage.db import DATABASE_URL_ATTRIBUTE, make_engine
from server.storage.models import Base
from server.storage.urls import normalize_url

#: Environment variable naming the database when alembic is run by hand.
DATABASE_URL_ENV = "LETHE_DATABASE_URL"


def database_url(config: Config) -> str:
    """The URL to migrate, see the module docstring."""
    url = config.attributes.get(DATABASE_URL_ATTRIBUTE) or os.environ.get(DATABASE_URL_ENV)
    if not url:
        url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError(
            f"no database URL: run `lethe db upgrade --database-url URL` or set {DATABASE_URL_ENV} for alembic"
        )
    return str(url)


def run_migrations_offline(config: Config) -> None:
    """Writes the migration SQL to stdout (``alembic upgrade head --sql``) without a database."""
    url = normalize_url(database_url(config))
    context.configure(
        url=url,
        target_metadata=Base.metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=url.get_backend_name() == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online(config: Config) -> None:
    """Migrates the database in one transaction."""
    engine = make_engine(database_url(config))
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
                # SQLite does support transactional DDL; only the sqlite3 module's legacy
                # transaction handling got in the way, and make_engine turns that off. So a
                # failing upgrade rolls back completely on both backends.
                transactional_ddl=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


def main() -> None:
    """Entry point Alembic runs when it loads this file."""
    config = context.config
    # Only the alembic command line configures logging; a programmatic upgrade inside the server
    # must not replace the server's logging setup.
    if config.config_file_name is not None and config.attributes.get("configure_logger", True):
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    if context.is_offline_mode():
        run_migrations_offline(config)
    else:
        run_migrations_online(config)


main()
