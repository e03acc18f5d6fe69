"""The expand of the application role's narrowing: money moves through owner functions.

- ``tandem_apply_delta_v1``, ``tandem_create_user_v1`` and ``tandem_transfer_v2`` (files in
  ``tandem/wallet/sql``): a balance change, a new user, a transfer, each with its journal
  entries in one statement, ``SECURITY DEFINER`` with the search_path pinned, no EXECUTE for
  PUBLIC (``tandem migrate`` grants it to the application's role, by name). Deposits and
  opening balances count against the owner's daily mint ceiling
  (``tandem_mint_allowed_v1``; ``wallet_settings.daily_mint_ceiling``, NULL: none) in
  ``mint_usage``, one row per day and backend. Neither table is the application's.
- ``users.balance`` defaults to 0: a row inserted without a balance creates no money.
- ``instances.revision``: the schema revision an instance's code was released with, written
  on join; the contract (0015) waits until no live instance is older.
- ``tandem_record_task_action_v1`` (``tandem/scheduler/sql``): a task command's audit row,
  appended as the owner the same way.
- ``task_actions`` is append-only by statement-level triggers (``tandem_append_only_v1``), as
  the journal is: an UPDATE, DELETE or TRUNCATE is refused for every role; nothing prunes it.
- The rights of the previous release stay (it still inserts and updates): 0015 takes them.

Revision ID: 0014_owner_functions
Revises: 0013_sessions_and_key_limits
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

from tandem.scheduler.functions import RECORD_TASK_ACTION_V1
from tandem.wallet.functions import (
    APPEND_ONLY_AUDIT_TABLES,
    APPEND_ONLY_V1,
    APPLY_DELTA_V1,
    CREATE_USER_V1,
    MINT_ALLOWED_V1,
    TRANSFER_V2,
)
from tandem.wallet.models import DEFAULT_BALANCE

revision: str = "0014_owner_functions"
down_revision: str | None = "0013_sessions_and_key_limits"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# In the order of creation: a caller after its callee.
FUNCTIONS = (MINT_ALLOWED_V1, APPLY_DELTA_V1, CREATE_USER_V1, TRANSFER_V2, RECORD_TASK_ACTION_V1)


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE wallet_settings (
            id boolean DEFAULT true NOT NULL,
            daily_mint_ceiling bigint,
            CONSTRAINT pk_wallet_settings PRIMARY KEY (id),
            CONSTRAINT ck_wallet_settings_one_row CHECK (id),
            CONSTRAINT ck_wallet_settings_daily_mint_ceiling_not_negative
                CHECK (daily_mint_ceiling >= 0)
        )
        """
    )
    op.execute("INSERT INTO wallet_settings DEFAULT VALUES")
    op.execute(
        """
        CREATE TABLE mint_usage (
            day date NOT NULL,
            backend integer NOT NULL,
            minted numeric NOT NULL,
            CONSTRAINT pk_mint_usage PRIMARY KEY (day, backend)
        )
        """
    )
    op.execute("REVOKE ALL ON wallet_settings, mint_usage FROM PUBLIC")
    op.execute("ALTER TABLE users ALTER COLUMN balance SET DEFAULT 0")
    op.execute("ALTER TABLE instances ADD COLUMN revision text")
    for function in FUNCTIONS:
        for statement in function.create_statements():
            op.execute(statement)
    for table in APPEND_ONLY_AUDIT_TABLES:
        # Statement-level: refused even when no row matches.
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE "
            f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {APPEND_ONLY_V1.name}()"
        )


def downgrade() -> None:
    for table in APPEND_ONLY_AUDIT_TABLES:
        op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
    for function in reversed(FUNCTIONS):
        op.execute(function.drop_statement())
    op.execute("ALTER TABLE instances DROP COLUMN revision")
    op.execute(f"ALTER TABLE users ALTER COLUMN balance SET DEFAULT '{DEFAULT_BALANCE}'::bigint")
    op.execute("DROP TABLE mint_usage")
    op.execute("DROP TABLE wallet_settings")
