"""The primary's lease (DESIGN.md section 9: one writer, hot standby, fencing).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

``leases``: one row per lease (``primary``): its epoch (the fencing token, one more at every
takeover), its holder, the holder's lease connection and the database's time of its last renewal.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Creates ``leases``."""
    op.create_table(
        "leases",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("holder", sa.String(length=256), nullable=False),
        sa.Column("backend_pid", sa.Integer(), nullable=True),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )


def downgrade() -> None:
    """Drops ``leases``."""
    op.drop_table("leases")
