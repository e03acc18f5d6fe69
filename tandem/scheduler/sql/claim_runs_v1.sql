-- tandem_claim_runs_v1: the claim of up to p_limit due runs, fair share included, in one call
-- (tandem_claim_run_v1 took one: at one claim per poll five instances started about five runs a
-- second, and thousands of schedules need hundreds).
--
-- The race it closes, as tandem_claim_run_v1's: the lock (2053963778 =
-- tandem.core.locks.CLAIM), the fair-share counts, the claims and their history rows are one
-- call: the lock is released at the end of the call's own transaction, before the answer is
-- sent, and p_lock_timeout bounds any wait for it. A function rather than one statement
-- because its reads must see the claims committed before the lock was granted (each statement
-- of a volatile function takes a new snapshot).
--
-- Fair share, by claims, for the batch: an instance may claim the due runs' share per live
-- instance (ceil(due / live), due counted up to 4 * p_limit per live instance) beyond the
-- least-served live instance's count plus p_slack; with one due run that is
-- tandem_claim_run_v1's rule (at most p_slack ahead, then one). Past its share, it takes runs
-- overdue past p_steal_after within its share beyond the least-served *fresh* instance
-- (heartbeat within p_fresh_window: the least-served live one is stopped, starved or cut
-- off), and past twice that one at a time, whoever it is (the least-served fresh one does not
-- take them either: its claims fail, or it has no code for the task). One at a time, so a
-- backlog overdue as a whole (10,000 due at once) still goes by the shares, not to the fastest
-- poller. "Live" means a database session that holds its lock (instance_sessions) and a
-- heartbeat within p_live_window; a claimer without its live session claims nothing (its runs
-- would be swept as lost at once). The lock makes the counts exact; safety never depends on
-- it (tandem_claim_rows_v1's row guards and the constraints).
CREATE FUNCTION tandem_claim_runs_v1(
    p_instance text, p_key integer, p_lease interval, p_live_window interval,
    p_steal_after interval, p_fresh_window interval, p_slack integer,
    p_known text[], p_lock_timeout text, p_limit integer)
RETURNS TABLE (task_id bigint, name text, task text, fence bigint,
               scheduled_for timestamptz, started_at timestamptz, recovers boolean,
               attempt integer, plan_next boolean, trigger text, version integer,
               params jsonb, overlapped boolean, spec_interval interval, schedule text,
               timezone text, missed text, timeout interval, max_attempts integer,
               grace interval, catch_up_limit integer, retry_backoff interval,
               retry_backoff_max interval, overlap text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    mine bigint;
    floor_live bigint;
    floor_fresh bigint;
    live integer;
    due integer;
    share bigint;
    allowed bigint;
BEGIN
    PERFORM set_config('lock_timeout', p_lock_timeout, true);
    PERFORM pg_advisory_xact_lock(2053963778);
    SELECT i.claims INTO mine FROM instances i
    JOIN instance_sessions s ON s.session_key = i.session_key
    WHERE i.id = p_instance AND i.session_key = p_key AND i.status = 'active';
    IF mine IS NULL THEN
        RETURN;
    END IF;
    SELECT min(i.claims),
           min(i.claims) FILTER (WHERE i.heartbeat_at > clock_timestamp() - p_fresh_window),
           count(*)
    INTO floor_live, floor_fresh, live
    FROM instances i JOIN instance_sessions s ON s.session_key = i.session_key
    WHERE i.status = 'active' AND i.heartbeat_at > clock_timestamp() - p_live_window;
    SELECT count(*) INTO due FROM (
        SELECT FROM tasks t
        WHERE t.enabled AND NOT t.is_running
          AND least(t.retry_at, t.next_run_at, t.manual_at) <= clock_timestamp()
          AND (p_known IS NULL OR coalesce(t.task, t.name) = ANY(p_known))
        LIMIT 4 * p_limit * greatest(live, 1)) d;
    IF due = 0 THEN
        RETURN;
    END IF;
    share := greatest(1, ceil(due::numeric / greatest(live, 1)))::bigint;
    allowed := coalesce(floor_live, mine) + p_slack + share - mine;
    IF allowed > 0 THEN
        RETURN QUERY SELECT * FROM tandem_claim_rows_v1(
            p_instance, p_lease, least(allowed, p_limit)::integer, interval '0', p_known);
        RETURN;
    END IF;
    allowed := coalesce(floor_fresh, mine) + p_slack + share - mine;
    IF allowed > 0 THEN
        RETURN QUERY SELECT * FROM tandem_claim_rows_v1(
            p_instance, p_lease, least(allowed, p_limit)::integer, p_steal_after, p_known);
    ELSE
        RETURN QUERY SELECT * FROM tandem_claim_rows_v1(
            p_instance, p_lease, 1, 2 * p_steal_after, p_known);
    END IF;
END $$;
