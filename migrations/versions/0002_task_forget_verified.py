"""Tasks record whether their forgetting was verified (DESIGN.md section 9, verified forgetting).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

``tasks.forget_verified``: NULL while not unlearned (or when nothing could be measured), else
whether the unlearn measured the task at its reference. Tasks unlearned before this revision
stay NULL: they were never checked.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Adds the nullable column ``tasks.forget_verified``."""
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("forget_verified", sa.Boolean(), nullable=True))


def downgrade() -> None:
    """Drops ``tasks.forget_verified``."""
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("forget_verified")
