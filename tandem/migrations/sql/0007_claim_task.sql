-- tandem_claim_task as migration 0007 made it (replaced by 0010's tandem_claim_run): what
-- 0010's downgrade restores. Its text is 0007's, byte for byte, so the restored function is
-- the one a database upgraded to 0007 has (the step-wise downgrade test compares them).

        CREATE FUNCTION tandem_claim_task(
            p_instance text, p_key integer, p_lease interval, p_live_window interval,
            p_steal_after interval, p_fresh_window interval, p_slack integer,
            p_known text[], p_lock_timeout text)
        RETURNS TABLE (task_id bigint, name text, function_name text, fence bigint,
                       scheduled_for timestamptz, started_at timestamptz, recovers boolean)
        LANGUAGE plpgsql AS $$
        #variable_conflict use_column
        DECLARE
            mine bigint;
            floor_live bigint;
            floor_fresh bigint;
        BEGIN
            PERFORM set_config('lock_timeout', p_lock_timeout, true);
            PERFORM pg_advisory_xact_lock(2053963778);
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
                SELECT t.id, t.next_run_at FROM tasks t
                WHERE t.enabled AND NOT t.is_running AND t.next_run_at <= clock_timestamp()
                  AND (p_known IS NULL OR t.name = ANY(p_known))
                  AND (mine <= coalesce(floor_live, mine) + p_slack
                       OR (t.next_run_at <= clock_timestamp() - p_steal_after
                           AND mine <= coalesce(floor_fresh, mine) + p_slack)
                       -- the least-served fresh one does not claim it either (its claims
                       -- fail, or it has no code for the task): anyone
                       OR t.next_run_at <= clock_timestamp() - 2 * p_steal_after)
                ORDER BY t.next_run_at, t.id
                LIMIT 1
                FOR UPDATE OF t SKIP LOCKED
            ), claimed AS (
                UPDATE tasks t
                SET is_running = true,
                    running_instance = p_instance,
                    started_at = clock_timestamp(),
                    lease_until = clock_timestamp() + p_lease,
                    fence = t.fence + 1,
                    next_run_at = c.next_run_at + t."interval" * (
                        floor(extract(epoch FROM clock_timestamp() - c.next_run_at)
                              / extract(epoch FROM t."interval")) + 1)
                FROM candidate c
                WHERE t.id = c.id AND NOT t.is_running
                RETURNING t.id, t.name, t.function_name, t.fence, c.next_run_at AS scheduled_for,
                          t.started_at, coalesce(t.last_status = 'lost', false) AS recovers
            ), counted AS (
                UPDATE instances SET claims = claims + 1
                WHERE id = p_instance AND EXISTS (SELECT FROM claimed)
            ), history AS (
                INSERT INTO task_history
                    (task_id, instance_id, fence, scheduled_for, started_at, status)
                SELECT id, p_instance, fence, scheduled_for, started_at, 'running' FROM claimed
            )
            SELECT * FROM claimed;
        END $$
        