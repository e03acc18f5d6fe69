-- tandem_claim_run_v1: the claim of a due run, fair share included, in one call.
--
-- The race it closes: the claim used to be a transaction of three statements holding a
-- cluster-wide advisory lock while it waited on the client between them, so a session cut
-- off in between kept the lock and stalled every claim in the cluster. Here the lock
-- (2053963778 = tandem.core.locks.CLAIM), the fair-share count, the claim and its history row
-- are one call: the lock is released at the end of the call's own transaction, before the
-- answer is even sent, and p_lock_timeout bounds any wait for it. A function rather than one
-- SQL statement because its reads must see the claims committed before the lock was granted
-- (each statement of a volatile function takes a new snapshot; the CTEs of one statement
-- share the first one).
--
-- Fair share, by claims: an instance takes a due task only while it has claimed at most
-- p_slack more runs than the least-served live instance. A task overdue past p_steal_after
-- goes to the least-served of the instances whose heartbeat is within p_fresh_window; past
-- twice that, to anyone. "Live" means a database session that holds its lock
-- (instance_sessions) and a heartbeat within p_live_window. A claimer without its live
-- session claims nothing: its run would be swept as lost at once. The lock makes the counts
-- exact; safety never depends on it (tandem_claim_row_v1's row guards and the constraints).
CREATE FUNCTION tandem_claim_run_v1(
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
    PERFORM pg_advisory_xact_lock(2053963778);
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
    RETURN QUERY SELECT * FROM tandem_claim_row_v1(
        p_instance, p_lease,
        mine <= coalesce(floor_live, mine) + p_slack,
        mine <= coalesce(floor_fresh, mine) + p_slack,
        p_steal_after, p_known);
END $$;
