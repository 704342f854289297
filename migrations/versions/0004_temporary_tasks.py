"""Temporary learning: which tasks live as side networks, and when they expire (DESIGN.md section 9, CLPU).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

``tasks.temporary``: the task is (to be) held by a side network -- from its TEMPORARY Learn's
acceptance until it is committed or unlearned; existing tasks are not. ``tasks.expires_at``: when
the server unlearns a TEMPORARY task that was not committed (NULL: never).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Adds ``tasks.temporary`` (false for every existing task) and the nullable ``tasks.expires_at``."""
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("temporary", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    """Drops both columns."""
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("expires_at")
        batch.drop_column("temporary")
