"""Schedules as data: a row of ``tasks`` is a schedule (its name kept: a rename would break
the previous release's instances during a rolling deploy), of a task (code), from code or
from the API, with its params, version and policies; history rows say which version ran, with
which params, on which trigger.

- ``tasks``: ``task`` (the code it runs; NULL on a row an earlier release wrote: its name),
  ``params``, ``source`` (``code``/``api``), ``version`` (+1 per change of spec or params),
  ``note``, ``created_by``/``updated_by`` (API keys), ``create_key`` (the create's
  Idempotency-Key), ``updated_at``, ``deleted_at`` (a soft
  delete disables the row and renames it ``<name>/<id>``: ``/`` is outside every name's
  charset, so the name is free again while uq_tasks_name, which the previous release's upsert
  names, stays), the per-schedule policies the code held until now (``grace``,
  ``catch_up_limit``, ``retry_backoff``, ``retry_backoff_max``) and the new one
  (``overlap``), a run asked for (``manual_at``, ``manual_params``) and a retry's params
  (``retry_params``).
- ``task_history``: ``schedule_version``, ``params``, ``trigger`` (NULL on an earlier
  release's rows).
- ``task_actions``: ``note``; the actions ``create``, ``change``, ``delete``.
- ``instances``: ``tasks``, the task names its code has (NULL: a release before this one),
  which says which schedules are orphaned.
- The claim of up to k runs per call (``tandem_claim_runs_v1`` over ``tandem_claim_rows_v1``)
  and ``tandem_record_task_action_v2``; the previous release's v1 functions stay.

Downgrading refuses while a schedule made through the API exists (its runs and audit rows
would be left without their meaning; the audit rows cannot be deleted).

Revision ID: 0020_schedules_as_data
Revises: 0019_change_stream
Create Date: 2026-12-08
"""

from collections.abc import Sequence

from alembic import op
from sqlalchemy import text

from tandem.scheduler.functions import SCHEDULES_AS_DATA

revision: str = "0020_schedules_as_data"
down_revision: str | None = "0019_change_stream"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UPGRADE = """
ALTER TABLE tasks
    ADD COLUMN task text,
    ADD COLUMN params jsonb DEFAULT '{}' NOT NULL,
    ADD COLUMN source text DEFAULT 'code' NOT NULL,
    ADD COLUMN version integer DEFAULT 1 NOT NULL,
    ADD COLUMN note text,
    ADD COLUMN created_by bigint,
    ADD COLUMN updated_by bigint,
    ADD COLUMN updated_at timestamptz DEFAULT clock_timestamp() NOT NULL,
    ADD COLUMN deleted_at timestamptz,
    ADD COLUMN overlap text DEFAULT 'skip' NOT NULL,
    ADD COLUMN grace interval,
    ADD COLUMN catch_up_limit integer,
    ADD COLUMN retry_backoff interval,
    ADD COLUMN retry_backoff_max interval,
    ADD COLUMN manual_at timestamptz,
    ADD COLUMN manual_params jsonb,
    ADD COLUMN retry_params jsonb,
    ADD COLUMN create_key text,
    ADD CONSTRAINT fk_tasks_created_by_api_keys FOREIGN KEY (created_by) REFERENCES api_keys (id),
    ADD CONSTRAINT fk_tasks_updated_by_api_keys FOREIGN KEY (updated_by) REFERENCES api_keys (id),
    ADD CONSTRAINT ck_tasks_source CHECK (source IN ('code', 'api')),
    ADD CONSTRAINT ck_tasks_overlap CHECK (overlap IN ('skip', 'buffer_one', 'cancel_other')),
    ADD CONSTRAINT ck_tasks_version CHECK (version >= 1),
    ADD CONSTRAINT ck_tasks_params_object CHECK (jsonb_typeof(params) = 'object'),
    ADD CONSTRAINT ck_tasks_deleted_disabled CHECK (deleted_at IS NULL OR NOT enabled);
CREATE INDEX ix_tasks_due_v2 ON tasks (least(retry_at, next_run_at, manual_at))
    WHERE enabled AND NOT is_running;
CREATE INDEX ix_tasks_running ON tasks (running_instance) WHERE is_running;
ALTER TABLE task_history
    ADD COLUMN schedule_version integer,
    ADD COLUMN params jsonb,
    ADD COLUMN trigger text,
    ADD CONSTRAINT ck_task_history_trigger CHECK (trigger IN ('schedule', 'manual', 'retry'));
ALTER TABLE task_actions
    ADD COLUMN note text,
    DROP CONSTRAINT ck_task_actions_action,
    ADD CONSTRAINT ck_task_actions_action
        CHECK (action IN ('run', 'pause', 'resume', 'create', 'change', 'delete'));
ALTER TABLE instances ADD COLUMN tasks text[]
"""

DOWNGRADE = """
ALTER TABLE instances DROP COLUMN tasks;
ALTER TABLE task_actions
    DROP CONSTRAINT ck_task_actions_action,
    ADD CONSTRAINT ck_task_actions_action CHECK (action IN ('run', 'pause', 'resume')),
    DROP COLUMN note;
ALTER TABLE task_history DROP COLUMN schedule_version, DROP COLUMN params,
    DROP COLUMN trigger;
DROP INDEX ix_tasks_running;
DROP INDEX ix_tasks_due_v2;
ALTER TABLE tasks DROP COLUMN task, DROP COLUMN params, DROP COLUMN source,
    DROP COLUMN version, DROP COLUMN note, DROP COLUMN created_by, DROP COLUMN updated_by,
    DROP COLUMN updated_at, DROP COLUMN deleted_at, DROP COLUMN overlap,
    DROP COLUMN grace, DROP COLUMN catch_up_limit, DROP COLUMN retry_backoff,
    DROP COLUMN retry_backoff_max, DROP COLUMN manual_at, DROP COLUMN manual_params,
    DROP COLUMN retry_params, DROP COLUMN create_key
"""


def _run(script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            op.execute(statement)


def upgrade() -> None:
    _run(UPGRADE)
    for function in SCHEDULES_AS_DATA:
        for statement in function.create_statements():
            op.execute(statement)


def downgrade() -> None:
    made = op.get_bind().execute(text("SELECT count(*) FROM tasks WHERE source = 'api'")).scalar()
    if made:
        raise RuntimeError(
            f"cannot downgrade below 0020_schedules_as_data: {made} schedule(s) were made "
            "through the API (deleted ones included), which the earlier schema cannot hold"
        )
    for function in reversed(SCHEDULES_AS_DATA):
        op.execute(function.drop_statement())
    _run(DOWNGRADE)
