-- tandem_claim_row_v1: the row-level half of the claim. Picks the earliest due task this
-- instance may take and takes it: the task's row, the instance's claim count and the run's
-- history row, in one statement.
--
-- The races it closes, by row guards alone (it takes no advisory lock, so a test can race it
-- with the cluster-wide claim lock held elsewhere):
-- - FOR UPDATE SKIP LOCKED: two claimers never pick the same row (the second skips it);
-- - NOT is_running, re-checked by the UPDATE under the row lock: a task claimed meanwhile
--   (committed after this statement's snapshot) is never claimed again;
-- - the history's unique key (task, slot, attempt) and its exclusion constraint (no two runs
--   of a task overlap in time) refuse whatever would slip past both.
-- A slot that already has a run (a schedule changed back, a clock stepped back) is run as its
-- next attempt: a claim never fails on the history's unique key, which would stop every
-- claim of the cluster at this task. A due retry goes before a regular slot and keeps it; the
-- claim of a regular slot clears next_run_at for the claimer to plan (a cron expression is
-- evaluated in Python), and leaves a pending retry that is not due yet.
--
-- p_fair: the instance is within its fair share of the live instances' claims; p_fair_fresh:
-- within its fair share of the fresh ones' (the steal rule). Decided by the caller
-- (tandem_claim_run_v1), under the claim lock, so the counts are exact.
CREATE FUNCTION tandem_claim_row_v1(
    p_instance text, p_lease interval, p_fair boolean, p_fair_fresh boolean,
    p_steal_after interval, p_known text[])
RETURNS TABLE (task_id bigint, name text, function_name text, fence bigint,
               scheduled_for timestamptz, started_at timestamptz, recovers boolean,
               attempt integer, plan_next boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH candidate AS (
        SELECT t.id, t.next_run_at, t.retry_slot, t.retry_attempt,
               coalesce(t.retry_at <= clock_timestamp(), false) AS is_retry
        FROM tasks t
        WHERE t.enabled AND NOT t.is_running
          AND least(t.retry_at, t.next_run_at) <= clock_timestamp()
          AND (p_known IS NULL OR t.name = ANY(p_known))
          AND (p_fair
               OR (least(t.retry_at, t.next_run_at) <= clock_timestamp() - p_steal_after
                   AND p_fair_fresh)
               -- the least-served fresh one does not claim it either (its claims fail, or
               -- it has no code for the task): anyone
               OR least(t.retry_at, t.next_run_at) <= clock_timestamp() - 2 * p_steal_after)
        ORDER BY least(t.retry_at, t.next_run_at), t.id
        LIMIT 1
        FOR UPDATE OF t SKIP LOCKED
    ), chosen AS (
        SELECT c.*, s.slot, greatest(
                   CASE WHEN c.is_retry THEN c.retry_attempt ELSE 1 END,
                   (SELECT max(h.attempt) + 1 FROM task_history h
                    WHERE h.task_id = c.id AND h.scheduled_for = s.slot)) AS attempt
        FROM candidate c
        CROSS JOIN LATERAL (
            SELECT CASE WHEN c.is_retry THEN c.retry_slot ELSE c.next_run_at END AS slot) s
    ), claimed AS (
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
END $$;
