"""The sample index (records-level forgetting) and signed audit events (DESIGN.md section 9).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

``samples``: one row per sample id a Learn stream carried (or the server made), as an HMAC-SHA-256
digest under the server's sample-id key (never the id in clear), while the server keeps the
sample's data; ``forget_job_id`` names the records unlearn that claimed it.
``audit_events.signature`` and ``audit_head.signature``: Ed25519 signatures (hex) of the event's
hash and of the head; events written before this revision keep an empty signature.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Creates ``samples`` and adds the signature columns."""
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("task", sa.String(length=128), nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("forget_job_id", sa.String(length=32), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_samples")),
        sa.UniqueConstraint("task", "digest", name=op.f("uq_samples_task_digest")),
    )
    op.create_index(op.f("ix_samples_digest"), "samples", ["digest"], unique=False)
    op.create_index(op.f("ix_samples_job_id"), "samples", ["job_id"], unique=False)
    op.create_index(op.f("ix_samples_forget_job_id"), "samples", ["forget_job_id"], unique=False)
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("signature", sa.String(length=128), nullable=False, server_default=""))
    with op.batch_alter_table("audit_events") as batch:  # the default only fills existing rows
        batch.alter_column("signature", server_default=None)
    with op.batch_alter_table("audit_head") as batch:
        batch.add_column(sa.Column("signature", sa.String(length=128), nullable=False, server_default=""))
    with op.batch_alter_table("audit_head") as batch:  # the default only fills existing rows
        batch.alter_column("signature", server_default=None)


def downgrade() -> None:
    """Drops the signature columns and ``samples``."""
    with op.batch_alter_table("audit_head") as batch:
        batch.drop_column("signature")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("signature")
    op.drop_index(op.f("ix_samples_forget_job_id"), table_name="samples")
    op.drop_index(op.f("ix_samples_job_id"), table_name="samples")
    op.drop_index(op.f("ix_samples_digest"), table_name="samples")
    op.drop_table("samples")
