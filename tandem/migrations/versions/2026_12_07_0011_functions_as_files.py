"""Server-side functions as versioned files, and the overlap guard once.

- Every server-side function is created again under a versioned name from its file
  (``tandem/scheduler/sql``, ``tandem/wallet/sql``): ``tandem_claim_run_v1``,
  ``tandem_heartbeat_v1``, ``tandem_open_session_v1``, ``tandem_transfer_v1``,
  ``tandem_append_only_v1``. The claim's row-level part becomes a function of its own,
  ``tandem_claim_row_v1`` (called by ``tandem_claim_run_v1`` under the claim lock), so its
  row guards can be exercised without that lock. Their bodies are those of 0007-0010.
- The unversioned functions stay, unchanged: instances of the previous release call them
  during a rolling deploy. A later release drops them.
- The journal's append-only triggers execute ``tandem_append_only_v1`` (the migration's
  transaction covers the swap: no statement sees a table without its trigger).
- ``uq_task_history_one_running`` is dropped: the exclusion constraint
  ``ex_task_history_no_overlap`` already refuses a second running row of a task (two running
  rows are two ranges open to infinity, which always overlap).

Revision ID: 0011_functions_as_files
Revises: 0010_schedules_and_retries
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

from tandem.scheduler.functions import CLAIM_ROW_V1, CLAIM_RUN_V1, HEARTBEAT_V1, OPEN_SESSION_V1
from tandem.wallet.functions import APPEND_ONLY_TABLES, APPEND_ONLY_V1, TRANSFER_V1

revision: str = "0011_functions_as_files"
down_revision: str | None = "0010_schedules_and_retries"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# In the order of creation: a caller after its callee.
FUNCTIONS = (CLAIM_ROW_V1, CLAIM_RUN_V1, OPEN_SESSION_V1, HEARTBEAT_V1, TRANSFER_V1, APPEND_ONLY_V1)


def _append_only_triggers(function: str) -> None:
    for table in APPEND_ONLY_TABLES:
        op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
        # Statement-level: refused even when no row matches.
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
        )


def upgrade() -> None:
    for function in FUNCTIONS:
        for statement in function.create_statements():
            op.execute(statement)
    _append_only_triggers(APPEND_ONLY_V1.name)
    op.execute("DROP INDEX uq_task_history_one_running")


def downgrade() -> None:
    op.execute(
        "CREATE UNIQUE INDEX uq_task_history_one_running ON task_history (task_id) "
        "WHERE status = 'running'"
    )
    # The functions of 0007-0010 were kept: the triggers go back to theirs.
    _append_only_triggers("tandem_append_only")
    for function in reversed(FUNCTIONS):
        op.execute(function.drop_statement())
