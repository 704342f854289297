"""Initial schema: tasks, jobs, evaluations, audit log, data files.

Revision ID: 0001
Revises:
Create Date: 2026-11-21

Written by hand from ``server/storage/models.py`` (migrations are history: they use plain column
types, never the application's, so later model changes cannot rewrite them).
``tests/storage/test_migrations.py`` checks that the result matches the models exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS_HASH = "0" * 64


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    """Creates every table and the audit head row."""
    op.create_table(
        "tasks",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("classes_json", sa.Text(), nullable=False),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("relapse", sa.Float(), nullable=True),
        sa.Column("unlearned_accuracy", sa.Float(), nullable=True),
        sa.Column("learned_version", sa.Integer(), nullable=True),
        sa.Column("unlearned_version", sa.Integer(), nullable=True),
        sa.Column("ops_since_unlearn", sa.Integer(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("learned_at", _utc(), nullable=True),
        sa.Column("unlearned_at", _utc(), nullable=True),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.CheckConstraint(
            "state IN ('learning', 'learned', 'temporary', 'unlearning', 'unlearned')", name=op.f("ck_tasks_state")
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_tasks")),
    )

    op.create_table(
        "jobs",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("task", sa.String(length=128), nullable=False),
        sa.Column("method", sa.String(length=64), nullable=False),
        sa.Column("idempotency_key", sa.String(length=256), nullable=True),
        sa.Column("principal", sa.String(length=128), nullable=False),
        sa.Column("options_json", sa.Text(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("metrics_json", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("started_at", _utc(), nullable=True),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.CheckConstraint("kind IN ('learn', 'unlearn', 'commit')", name=op.f("ck_jobs_kind")),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name=op.f("ck_jobs_state")
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_jobs")),
        sa.UniqueConstraint("id", name=op.f("uq_jobs_id")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_jobs_idempotency_key")),
        # Never reuse a seq, even after deleting the newest job: seq is the paging cursor.
        sqlite_autoincrement=True,
    )
    op.create_index("ix_jobs_state_kind_seq", "jobs", ["state", "kind", "seq"], unique=False)
    op.create_index(op.f("ix_jobs_task"), "jobs", ["task"], unique=False)

    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_seq", sa.Integer(), nullable=False),
        sa.Column("task", sa.String(length=128), nullable=False),
        sa.Column("accuracy", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["job_seq"], ["jobs.seq"], name=op.f("fk_evaluations_job_seq_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
        sa.UniqueConstraint("job_seq", "task", name=op.f("uq_evaluations_job_seq_task")),
    )
    op.create_index(op.f("ix_evaluations_job_seq"), "evaluations", ["job_seq"], unique=False)

    op.create_table(
        "audit_events",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("at", _utc(), nullable=False),
        sa.Column("principal", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("task", sa.String(length=128), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("details_json", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_audit_events")),
    )
    op.create_index(op.f("ix_audit_events_task"), "audit_events", ["task"], unique=False)

    audit_head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("last_hash", sa.String(length=64), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_audit_head_single_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_head")),
    )
    op.bulk_insert(audit_head, [{"id": 1, "last_seq": 0, "last_hash": GENESIS_HASH}])

    op.create_table(
        "data_files",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("task", sa.String(length=128), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=True),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("purged_at", _utc(), nullable=True),
        sa.CheckConstraint(
            "kind IN ('spool', 'probe', 'retained', 'member', 'checkpoint')", name=op.f("ck_data_files_kind")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_data_files")),
        sa.UniqueConstraint("path", name=op.f("uq_data_files_path")),
    )
    op.create_index(op.f("ix_data_files_task"), "data_files", ["task"], unique=False)


def downgrade() -> None:
    """Drops every table (and with them all data)."""
    op.drop_index(op.f("ix_data_files_task"), table_name="data_files")
    op.drop_table("data_files")
    op.drop_table("audit_head")
    op.drop_index(op.f("ix_audit_events_task"), table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_index(op.f("ix_evaluations_job_seq"), table_name="evaluations")
    op.drop_table("evaluations")
    op.drop_index(op.f("ix_jobs_task"), table_name="jobs")
    op.drop_index("ix_jobs_state_kind_seq", table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("tasks")
