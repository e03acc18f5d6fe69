"""Browser sessions that end, and per-key limits.

- ``browser_sessions``: a login's random session token (its SHA-256), its key, issue and
  expiry times and the end a logout gives it. The cookie no longer holds the key.
- ``api_keys`` gains its limits, NULL (off) for every existing key: debits per UTC minute,
  hour and day, and a request rate (``rate_requests`` per ``rate_seconds``); and
  ``parent_key_id``, the key that minted it through POST /keys, whose limits it has and
  whose debit windows and rate count its requests too (NULL: its own).
- ``key_debits``: money that left users by a limited key, per window and server backend.
- ``tandem_start_session_v1`` and ``tandem_end_session_v1`` (tandem/access/sql/): a login
  starts a session only from the key's raw token, hashed in the database; a logout only ends
  one (owner-defined, granted by name to the application's role; 0015 takes its INSERT and
  UPDATE on ``browser_sessions``).

Revision ID: 0013_sessions_and_key_limits
Revises: 0012_bound_keys
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tandem.access.functions import END_SESSION_V1, START_SESSION_V1

revision: str = "0013_sessions_and_key_limits"
down_revision: str | None = "0012_bound_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for column in ("debit_per_minute", "debit_per_hour", "debit_per_day", "rate_requests"):
        op.add_column("api_keys", sa.Column(column, sa.BigInteger()))
    op.add_column("api_keys", sa.Column("rate_seconds", sa.Integer()))
    op.add_column("api_keys", sa.Column("parent_key_id", sa.BigInteger()))
    op.create_foreign_key(
        "fk_api_keys_parent_key_id_api_keys", "api_keys", "api_keys", ["parent_key_id"], ["id"]
    )
    op.create_check_constraint(
        "debit", "api_keys", "debit_per_minute > 0 AND debit_per_hour > 0 AND debit_per_day > 0"
    )
    op.create_check_constraint(
        "rate",
        "api_keys",
        "(rate_requests IS NULL) = (rate_seconds IS NULL) AND rate_requests > 0 "
        "AND rate_seconds IN (1, 60, 3600)",
    )
    op.create_table(
        "browser_sessions",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("token_sha256", sa.LargeBinary(), nullable=False),
        sa.Column("api_key_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("clock_timestamp()"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
        sa.ForeignKeyConstraint(["api_key_id"], ["api_keys.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_sha256", name="uq_browser_sessions_token_sha256"),
    )
    op.create_index("ix_browser_sessions_api_key_id", "browser_sessions", ["api_key_id"])
    op.create_table(
        "key_debits",
        sa.Column("api_key_id", sa.BigInteger(), nullable=False),
        sa.Column("seconds", sa.Integer(), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("backend", sa.Integer(), nullable=False),
        sa.Column("amount", sa.Numeric(), nullable=False),
        sa.UniqueConstraint(
            "api_key_id", "seconds", "window_start", "backend", name="uq_key_debits"
        ),
    )
    for function in (START_SESSION_V1, END_SESSION_V1):
        for statement in function.create_statements():
            op.execute(statement)


def downgrade() -> None:
    for function in (END_SESSION_V1, START_SESSION_V1):
        op.execute(function.drop_statement())
    # A limited key would be an unlimited one without these columns (as 0012 does for bound
    # and expiring keys): revoked, not silently widened.
    op.execute(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, clock_timestamp()) "
        "WHERE debit_per_minute IS NOT NULL OR debit_per_hour IS NOT NULL "
        "OR debit_per_day IS NOT NULL OR rate_requests IS NOT NULL"
    )
    op.drop_table("key_debits")
    op.drop_table("browser_sessions")
    op.drop_constraint("ck_api_keys_rate", "api_keys")
    op.drop_constraint("ck_api_keys_debit", "api_keys")
    op.drop_constraint("fk_api_keys_parent_key_id_api_keys", "api_keys")
    for column in (
        "parent_key_id",
        "rate_seconds",
        "rate_requests",
        "debit_per_day",
        "debit_per_hour",
        "debit_per_minute",
    ):
        op.drop_column("api_keys", column)
