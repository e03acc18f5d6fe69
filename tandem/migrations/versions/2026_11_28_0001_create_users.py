"""Create users, with a database-enforced non-negative balance, and user 1, so a client can
start without creating one.

Revision ID: 0001_create_users
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_create_users"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("balance", sa.BigInteger(), nullable=False, server_default="10000"),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.CheckConstraint("balance >= 0", name=op.f("ck_users_balance_not_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
    )
    # Clients written against the original plan expect user 1 with 10000.
    op.execute("INSERT INTO users (balance) VALUES (10000)")


def downgrade() -> None:
    op.drop_table("users")
