"""Migrations reach head, match the models exactly, and can be run from anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Engine, Integer, MetaData, String, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from server.storage import (
    GENESIS_HASH,
    Base,
    DataFile,
    DataFileKind,
    Job,
    JobKind,
    JobState,
    Task,
    TaskState,
    alembic_config,
    current_revision,
    db,
    head_revision,
    make_engine,
    migrations_dir,
    upgrade,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TABLES = {
    "tasks",
    "jobs",
    "evaluations",
    "audit_events",
    "audit_head",
    "data_files",
    "samples",
    "leases",
    "blobs",
    "blob_chunks",
}


def _differences(engine: Engine, metadata: MetaData) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
        return list(compare_metadata(context, metadata))


def test_upgrade_reaches_head_and_creates_every_table(db_engine: Engine) -> None:
    assert current_revision(db_engine) == head_revision()
    assert set(inspect(db_engine).get_table_names()) == TABLES | {"alembic_version"}


def test_migrated_schema_matches_the_models_exactly(db_engine: Engine) -> None:
    assert _differences(db_engine, Base.metadata) == []


def test_schema_comparison_would_notice_a_drift(db_engine: Engine) -> None:
    # Guards the test above against comparing nothing: model changes must show up.
    drifted = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.sorted_tables:
        table.to_metadata(drifted)
    drifted.tables["tasks"].append_column(Column("extra", Integer, nullable=True))
    drifted.tables["jobs"].c.method.type = String(length=10)
    kinds = {_kind(difference) for difference in _differences(db_engine, drifted)}
    assert kinds == {"add_column", "modify_type"}


def _kind(difference: object) -> str:
    # compare_metadata yields ("add_column", ...) tuples, and lists of ("modify_type", ...) tuples.
    entry = difference[0] if isinstance(difference, list) else difference
    assert isinstance(entry, tuple)
    return str(entry[0])


def test_migration_inserts_the_audit_head(db_engine: Engine) -> None:
    with db_engine.connect() as connection:
        rows = connection.execute(text("SELECT id, last_seq, last_hash FROM audit_head")).all()
    assert [tuple(row) for row in rows] == [(1, 0, GENESIS_HASH)]


def test_upgrade_twice_is_harmless_and_downgrade_round_trips(migrated_url: str) -> None:
    upgrade(migrated_url)
    command.downgrade(alembic_config(migrated_url), "base")
    engine = make_engine(migrated_url)
    try:
        assert current_revision(engine) is None
        assert not TABLES & set(inspect(engine).get_table_names())
        upgrade(migrated_url)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_check_constraints_reject_unknown_states(db_engine: Engine) -> None:
    with pytest.raises(IntegrityError), db_engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO tasks (name, state, samples, classes_json, ops_since_unlearn, created_at, updated_at) "
                "VALUES ('t', 'forgotten', 0, '[]', 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
    with pytest.raises(IntegrityError), db_engine.begin() as connection:
        connection.execute(text("INSERT INTO audit_head (id, last_seq, last_hash) VALUES (2, 0, 'x')"))


def test_upgrade_works_from_any_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    url = f"sqlite:///{tmp_path / 'nested' / 'dir' / 'lethe.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
    assert migrations_dir() == REPO_ROOT / "migrations"


def test_alembic_command_line_uses_lethe_database_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    environment = {**os.environ, "LETHE_DATABASE_URL": url}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), "upgrade", "head"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    engine = make_engine(url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_migrations_are_found_through_the_installed_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if the package had been copied away from the checkout (e.g. into site-packages): the
    # source tree pip recorded in direct_url.json (PEP 610, editable or local installs) is used.
    monkeypatch.setattr(db, "__file__", "/nowhere/site-packages/server/storage/db.py")
    monkeypatch.delenv(db.MIGRATIONS_DIR_ENV, raising=False)
    assert migrations_dir() == REPO_ROOT / "migrations"


def test_missing_migrations_are_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(db, "__file__", "/nowhere/site-packages/server/storage/db.py")
    monkeypatch.setattr(db, "_installed_source_tree", lambda: None)
    monkeypatch.setenv(db.MIGRATIONS_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=db.MIGRATIONS_DIR_ENV):
        migrations_dir()


def test_check_constraints_accept_every_enum_value(session_factory: sessionmaker[Session]) -> None:
    # compare_metadata does not compare CHECK constraints: this catches an enum member added to
    # the models without a migration that widens the constraint.
    with session_factory.begin() as session:
        session.add_all(Task(name=f"task-{state}", state=state) for state in TaskState)
        session.add_all(Job(id=f"{index:032x}", kind=kind, task="t") for index, kind in enumerate(JobKind))
        session.add_all(
            Job(id=f"{index + 10:032x}", kind=JobKind.LEARN, state=state, task="t")
            for index, state in enumerate(JobState)
        )
        session.add_all(
            DataFile(kind=kind, task="t", path=f"files/{kind}", bytes=1, sha256="0" * 64) for kind in DataFileKind
        )
