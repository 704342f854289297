"""The ``postgresql`` blob store (``storage.blob_url = "postgresql"``, DESIGN.md section 9).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

``blobs``: one row per data file kept in the database (spools, probe/member/retained sets,
checkpoints): its path (NULL while it is being written), the path it is written for, size, SHA-256
and chunk size. ``blob_chunks``: its bytes, in chunks of ``chunk_bytes``. On PostgreSQL the chunks
are stored uncompressed (``STORAGE EXTERNAL``): model weights and float samples do not compress,
and trying costs CPU on every write. The tables exist (empty) on SQLite too, which refuses the
``postgresql`` blob store: one schema everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Creates ``blobs`` and ``blob_chunks``."""
    op.create_table(
        "blobs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("path", sa.String(length=512), nullable=True),
        sa.Column("pending_path", sa.String(length=512), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("chunk_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_blobs")),
        sa.UniqueConstraint("path", name=op.f("uq_blobs_path")),
    )
    op.create_table(
        "blob_chunks",
        sa.Column("blob_id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["blob_id"], ["blobs.id"], name=op.f("fk_blob_chunks_blob_id_blobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("blob_id", "seq", name=op.f("pk_blob_chunks")),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE blob_chunks ALTER COLUMN data SET STORAGE EXTERNAL")


def downgrade() -> None:
    """Drops ``blob_chunks`` and ``blobs``."""
    op.drop_table("blob_chunks")
    op.drop_table("blobs")
