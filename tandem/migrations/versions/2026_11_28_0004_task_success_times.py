"""Tasks remember when they were registered and when they last succeeded.

For the alert on a task that has not succeeded for several of its intervals.

Revision ID: 0004_task_success_times
Revises: 0003_create_scheduler
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004_task_success_times"
down_revision: str | None = "0003_create_scheduler"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE tasks
            ADD COLUMN created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
            ADD COLUMN last_succeeded_at timestamptz
        """
    )
    op.execute(
        """
        UPDATE tasks t SET last_succeeded_at = h.finished_at
        FROM (SELECT task_id, max(finished_at) AS finished_at FROM task_history
              WHERE status = 'succeeded' GROUP BY task_id) h
        WHERE h.task_id = t.id
        """
    )


def downgrade() -> None:
    op.execute("ALTER TABLE tasks DROP COLUMN last_succeeded_at, DROP COLUMN created_at")
