"""Cron schedules in time zones, missed-slot policies, timeouts and retries.

- ``tasks``: the definition's new columns, written from code at every start like the
  interval (``schedule`` + ``timezone`` for a cron task, NULL for an interval one; ``missed``,
  ``timeout``, ``max_attempts``), and the pending retry (``retry_at``, ``retry_slot``,
  ``retry_attempt``: the attempt of which slot is due when).
- ``next_run_at`` may be NULL for a moment: the claim of a regular slot clears it, and the
  claimer (which can evaluate a cron expression; SQL cannot) plans the next slot right after,
  from the claim's database time (``tandem/scheduler/schedules.py``). Should the claimer die
  before, its run is swept as lost, its retry is due at once, and whoever claims that plans
  the next slot: a task is never left without one.
- ``task_history.attempt``: each attempt at a slot is its own row; the unique key becomes
  (task, slot, attempt). New statuses: ``timed_out`` (cancelled by the task's timeout) and
  ``skipped`` (the missed slots a claim passed over, policy skip).
- ``tandem_claim_run`` replaces ``tandem_claim_task`` (dropped, so an instance of the
  previous version claims nothing rather than claiming without planning): a due retry goes
  before a regular slot; the fair-share and steal rules are unchanged.

Revision ID: 0010_schedules_and_retries
Revises: 0009_api_keys
Create Date: 2026-12-02
"""

from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "0010_schedules_and_retries"
down_revision: str | None = "0009_api_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CLAIM_LOCK = 0x7A6D_0002
_HISTORY_STATUSES = "'running', 'succeeded', 'failed', 'lost', 'cancelled'"

CLAIM_FUNCTION = f"""
CREATE FUNCTION tandem_claim_run(
    p_instance text, p_key integer, p_lease interval, p_live_window interval,
    p_steal_after interval, p_fresh_window interval, p_slack integer,
    p_known text[], p_lock_timeout text)
RETURNS TABLE (task_id bigint, name text, function_name text, fence bigint,
               scheduled_for timestamptz, started_at timestamptz, recovers boolean,
               attempt integer, plan_next boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    mine bigint;
    floor_live bigint;
    floor_fresh bigint;
BEGIN
    PERFORM set_config('lock_timeout', p_lock_timeout, true);
    PERFORM pg_advisory_xact_lock({CLAIM_LOCK});
    -- A claimer without its live session would see its run swept as lost at once.
    SELECT i.claims INTO mine FROM instances i
    JOIN instance_sessions s ON s.session_key = i.session_key
    WHERE i.id = p_instance AND i.session_key = p_key AND i.status = 'active';
    IF mine IS NULL THEN
        RETURN;
    END IF;
    SELECT min(i.claims),
           min(i.claims) FILTER (WHERE i.heartbeat_at > clock_timestamp() - p_fresh_window)
    INTO floor_live, floor_fresh
    FROM instances i JOIN instance_sessions s ON s.session_key = i.session_key
    WHERE i.status = 'active' AND i.heartbeat_at > clock_timestamp() - p_live_window;
    RETURN QUERY
    WITH candidate AS (
        SELECT t.id, t.next_run_at, t.retry_slot, t.retry_attempt,
               coalesce(t.retry_at <= clock_timestamp(), false) AS is_retry
        FROM tasks t
        WHERE t.enabled AND NOT t.is_running
          AND least(t.retry_at, t.next_run_at) <= clock_timestamp()
          AND (p_known IS NULL OR t.name = ANY(p_known))
          AND (mine <= coalesce(floor_live, mine) + p_slack
               OR (least(t.retry_at, t.next_run_at) <= clock_timestamp() - p_steal_after
                   AND mine <= coalesce(floor_fresh, mine) + p_slack)
               -- the least-served fresh one does not claim it either (its claims fail, or
               -- it has no code for the task): anyone
               OR least(t.retry_at, t.next_run_at) <= clock_timestamp() - 2 * p_steal_after)
        ORDER BY least(t.retry_at, t.next_run_at), t.id
        LIMIT 1
        FOR UPDATE OF t SKIP LOCKED
    ), chosen AS (
        -- A slot that already has a run (a schedule changed back, a clock stepped back) is
        -- run as its next attempt: a claim never fails on the history's unique key, which
        -- would stop every claim of the cluster at this task.
        SELECT c.*, s.slot, greatest(
                   CASE WHEN c.is_retry THEN c.retry_attempt ELSE 1 END,
                   (SELECT max(h.attempt) + 1 FROM task_history h
                    WHERE h.task_id = c.id AND h.scheduled_for = s.slot)) AS attempt
        FROM candidate c
        CROSS JOIN LATERAL (
            SELECT CASE WHEN c.is_retry THEN c.retry_slot ELSE c.next_run_at END AS slot) s
    ), claimed AS (
        -- A retry keeps the regular slot; a regular slot's claim clears it for the claimer
        -- to plan (and leaves a pending retry that is not due yet).
        UPDATE tasks t
        SET is_running = true,
            running_instance = p_instance,
            started_at = clock_timestamp(),
            lease_until = clock_timestamp() + p_lease,
            fence = t.fence + 1,
            next_run_at = CASE WHEN c.is_retry THEN t.next_run_at END,
            retry_at = CASE WHEN c.is_retry THEN NULL ELSE t.retry_at END,
            retry_slot = CASE WHEN c.is_retry THEN NULL ELSE t.retry_slot END,
            retry_attempt = CASE WHEN c.is_retry THEN NULL ELSE t.retry_attempt END
        FROM chosen c
        WHERE t.id = c.id AND NOT t.is_running
        RETURNING t.id, t.name, t.function_name, t.fence, c.slot AS scheduled_for,
                  t.started_at, coalesce(t.last_status = 'lost', false) AS recovers,
                  c.attempt, t.next_run_at IS NULL AS plan_next
    ), counted AS (
        UPDATE instances SET claims = claims + 1
        WHERE id = p_instance AND EXISTS (SELECT FROM claimed)
    ), history AS (
        INSERT INTO task_history
            (task_id, instance_id, fence, scheduled_for, started_at, status, attempt)
        SELECT id, p_instance, fence, scheduled_for, started_at, 'running', attempt
        FROM claimed
    )
    SELECT * FROM claimed;
END $$
"""

_CLAIM_ARGS = "text, integer, interval, interval, interval, interval, integer, text[], text"


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE tasks
            ADD COLUMN schedule text,
            ADD COLUMN timezone text,
            ADD COLUMN missed text NOT NULL DEFAULT 'coalesce',
            ADD COLUMN timeout interval,
            ADD COLUMN max_attempts integer NOT NULL DEFAULT 1,
            ADD COLUMN retry_at timestamptz,
            ADD COLUMN retry_slot timestamptz,
            ADD COLUMN retry_attempt integer,
            ALTER COLUMN next_run_at DROP NOT NULL,
            ADD CONSTRAINT ck_tasks_missed CHECK (missed IN ('coalesce', 'skip', 'catch_up')),
            ADD CONSTRAINT ck_tasks_cron_zone CHECK ((schedule IS NULL) = (timezone IS NULL)),
            ADD CONSTRAINT ck_tasks_timeout_positive CHECK (timeout > interval '0'),
            ADD CONSTRAINT ck_tasks_max_attempts CHECK (max_attempts >= 1),
            ADD CONSTRAINT ck_tasks_retry_whole CHECK (
                (retry_at IS NULL) = (retry_slot IS NULL)
                AND (retry_at IS NULL) = (retry_attempt IS NULL)),
            ADD CONSTRAINT ck_tasks_retry_attempt CHECK (retry_attempt >= 2)
        """
    )
    op.execute("DROP INDEX ix_tasks_due")
    op.execute(
        "CREATE INDEX ix_tasks_due ON tasks ((least(retry_at, next_run_at))) "
        "WHERE enabled AND NOT is_running"
    )
    op.execute(
        f"""
        ALTER TABLE task_history
            ADD COLUMN attempt integer NOT NULL DEFAULT 1,
            ADD CONSTRAINT ck_task_history_attempt CHECK (attempt >= 1),
            DROP CONSTRAINT uq_task_history_task_id_scheduled_for,
            ADD CONSTRAINT uq_task_history_task_slot_attempt
                UNIQUE (task_id, scheduled_for, attempt),
            DROP CONSTRAINT ck_task_history_status,
            ADD CONSTRAINT ck_task_history_status CHECK (
                status IN ({_HISTORY_STATUSES}, 'timed_out', 'skipped'))
        """
    )
    op.execute(f"DROP FUNCTION tandem_claim_task({_CLAIM_ARGS})")
    op.execute(CLAIM_FUNCTION)


def downgrade() -> None:
    op.execute(f"DROP FUNCTION tandem_claim_run({_CLAIM_ARGS})")
    # 0007's claim function, as it was.
    op.execute((Path(__file__).parent.parent / "sql" / "0007_claim_task.sql").read_text())
    # What the old version cannot represent: retries' rows get distinct slots (a microsecond
    # per attempt), the new statuses become the nearest old ones.
    op.execute(
        """
        UPDATE task_history SET
            scheduled_for = scheduled_for + (attempt - 1) * interval '1 microsecond',
            status = CASE status WHEN 'timed_out' THEN 'failed' WHEN 'skipped' THEN 'cancelled'
                     ELSE status END
        WHERE attempt > 1 OR status IN ('timed_out', 'skipped')
        """
    )
    op.execute(
        f"""
        ALTER TABLE task_history
            DROP CONSTRAINT ck_task_history_status,
            ADD CONSTRAINT ck_task_history_status CHECK (status IN ({_HISTORY_STATUSES})),
            DROP CONSTRAINT uq_task_history_task_slot_attempt,
            ADD CONSTRAINT uq_task_history_task_id_scheduled_for UNIQUE (task_id, scheduled_for),
            DROP COLUMN attempt
        """
    )
    op.execute("DROP INDEX ix_tasks_due")
    # A pending retry becomes the next run (the old version has one due time).
    op.execute(
        "UPDATE tasks SET next_run_at = coalesce(least(next_run_at, retry_at), clock_timestamp()) "
        "WHERE next_run_at IS NULL OR retry_at IS NOT NULL"
    )
    op.execute(
        """
        ALTER TABLE tasks
            ALTER COLUMN next_run_at SET NOT NULL,
            DROP COLUMN schedule, DROP COLUMN timezone, DROP COLUMN missed,
            DROP COLUMN timeout, DROP COLUMN max_attempts,
            DROP COLUMN retry_at, DROP COLUMN retry_slot, DROP COLUMN retry_attempt
        """
    )
    op.execute("CREATE INDEX ix_tasks_due ON tasks (next_run_at) WHERE enabled AND NOT is_running")
