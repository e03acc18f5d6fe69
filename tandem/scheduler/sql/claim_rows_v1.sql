-- tandem_claim_rows_v1: the row-level half of the claim, for up to p_limit schedules at once.
-- Picks the earliest due schedules this instance may take (due by at least p_overdue: 0 for a
-- claim within fair share, the steal delay for a steal) and takes them: each schedule's row,
-- the instance's claim count and each run's history row, in one statement. What it returns
-- is read from the rows it locked: the spec, params, policies and version a run goes by are
-- the ones committed when it was claimed, never a copy an instance kept (a change is live at
-- the next claim on every instance).
--
-- The races it closes, by row guards alone (it takes no advisory lock, so a test can race it
-- with the cluster-wide claim lock held elsewhere):
-- - FOR UPDATE SKIP LOCKED: two claimers never pick the same row (the second skips it);
-- - NOT is_running, re-checked by the UPDATE under the row lock: a schedule claimed
--   meanwhile (committed after this statement's snapshot) is never claimed again;
-- - the history's unique key (schedule, slot, attempt) and its exclusion constraint (no two
--   runs of a schedule overlap in time) refuse whatever would slip past both.
-- A slot that already has a run is run as its next attempt: a claim never fails on the
-- history's unique key, which would stop every claim of the cluster at this schedule.
-- What is due, first to last: a due retry (it keeps its slot and, for a manual run's retry,
-- its params), then a run asked for through the API (manual_at: its slot is the moment it was
-- asked for, its params the ones given), then the regular slot (next_run_at, cleared for the
-- claimer to plan: a cron expression is evaluated in Python). A deleted schedule is disabled
-- (ck_tasks_deleted_disabled): never claimed. p_known: the task names this instance has code
-- for (a row of an earlier release has no task: its name is its task).
CREATE FUNCTION tandem_claim_rows_v1(
    p_instance text, p_lease interval, p_limit integer, p_overdue interval, p_known text[])
RETURNS TABLE (task_id bigint, name text, task text, fence bigint,
               scheduled_for timestamptz, started_at timestamptz, recovers boolean,
               attempt integer, plan_next boolean, trigger text, version integer,
               params jsonb, overlapped boolean, spec_interval interval, schedule text,
               timezone text, missed text, timeout interval, max_attempts integer,
               grace interval, catch_up_limit integer, retry_backoff interval,
               retry_backoff_max interval, overlap text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH candidate AS (
        SELECT t.id, t.next_run_at, t.retry_slot, t.retry_attempt, t.manual_at,
               t.started_at AS previous_start, t.last_finished_at AS previous_end,
               CASE WHEN t.retry_at <= clock_timestamp() THEN 'retry'
                    WHEN t.manual_at <= clock_timestamp() THEN 'manual'
                    ELSE 'schedule' END AS trigger,
               CASE WHEN t.retry_at <= clock_timestamp() THEN coalesce(t.retry_params, t.params)
                    WHEN t.manual_at <= clock_timestamp()
                    THEN coalesce(t.manual_params, t.params)
                    ELSE t.params END AS params
        FROM tasks t
        WHERE t.enabled AND NOT t.is_running
          AND least(t.retry_at, t.next_run_at, t.manual_at) <= clock_timestamp() - p_overdue
          AND (p_known IS NULL OR coalesce(t.task, t.name) = ANY(p_known))
        ORDER BY least(t.retry_at, t.next_run_at, t.manual_at), t.id
        LIMIT p_limit
        FOR UPDATE OF t SKIP LOCKED
    ), chosen AS (
        SELECT c.*, s.slot, greatest(
                   CASE WHEN c.trigger = 'retry' THEN c.retry_attempt ELSE 1 END,
                   (SELECT max(h.attempt) + 1 FROM task_history h
                    WHERE h.task_id = c.id AND h.scheduled_for = s.slot)) AS attempt
        FROM candidate c
        CROSS JOIN LATERAL (
            SELECT CASE c.trigger WHEN 'retry' THEN c.retry_slot
                                  WHEN 'manual' THEN c.manual_at
                                  ELSE c.next_run_at END AS slot) s
    ), claimed AS (
        UPDATE tasks t
        SET is_running = true,
            running_instance = p_instance,
            started_at = clock_timestamp(),
            lease_until = clock_timestamp() + p_lease,
            fence = t.fence + 1,
            next_run_at = CASE WHEN c.trigger = 'schedule' THEN NULL ELSE t.next_run_at END,
            retry_at = CASE WHEN c.trigger = 'retry' THEN NULL ELSE t.retry_at END,
            retry_slot = CASE WHEN c.trigger = 'retry' THEN NULL ELSE t.retry_slot END,
            retry_attempt = CASE WHEN c.trigger = 'retry' THEN NULL ELSE t.retry_attempt END,
            retry_params = CASE WHEN c.trigger = 'retry' THEN NULL ELSE t.retry_params END,
            manual_at = CASE WHEN c.trigger = 'manual' THEN NULL ELSE t.manual_at END,
            manual_params = CASE WHEN c.trigger = 'manual' THEN NULL ELSE t.manual_params END
        FROM chosen c
        WHERE t.id = c.id AND NOT t.is_running
        RETURNING t.id, t.name, coalesce(t.task, t.name) AS task, t.fence,
                  c.slot AS scheduled_for, t.started_at,
                  coalesce(t.last_status = 'lost', false) AS recovers, c.attempt,
                  c.trigger = 'schedule' AS plan_next, c.trigger, t.version, c.params,
                  -- the slot came due while the previous run was going (not before it
                  -- started: a missed slot's policy is the missed one)
                  coalesce(c.trigger = 'schedule' AND c.previous_start < c.slot
                           AND c.previous_end > c.slot, false) AS overlapped,
                  t."interval", t.schedule, t.timezone, t.missed, t.timeout, t.max_attempts,
                  t.grace, t.catch_up_limit, t.retry_backoff, t.retry_backoff_max, t.overlap
    ), counted AS (
        UPDATE instances SET claims = claims + (SELECT count(*) FROM claimed)
        WHERE id = p_instance AND EXISTS (SELECT FROM claimed)
    ), history AS (
        INSERT INTO task_history
            (task_id, instance_id, fence, scheduled_for, started_at, status, attempt,
             schedule_version, params, trigger)
        SELECT id, p_instance, fence, scheduled_for, started_at, 'running', attempt,
               version, params, trigger
        FROM claimed
    )
    SELECT * FROM claimed;
END $$;
