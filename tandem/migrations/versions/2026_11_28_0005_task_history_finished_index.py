"""Index task history by end time, for pruning old runs.

The housekeeping task deletes finished runs past their retention in batches; without this
index each batch would scan the whole history. (Idempotency keys have theirs since 0002.)

Revision ID: 0005_task_history_finished_index
Revises: 0004_task_success_times
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005_task_history_finished_index"
down_revision: str | None = "0004_task_success_times"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "CREATE INDEX ix_task_history_finished_at ON task_history (finished_at) "
        "WHERE finished_at IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DROP INDEX ix_task_history_finished_at")
