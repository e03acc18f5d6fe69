-- tandem_heartbeat_v1: membership, renewal of the (task, fence) pairs still held, and the
-- live count, in one round trip.
--
-- The races it closes: a renewal that reaches the server later than its sender allowed
-- (p_anchor + p_valid_for, by the database clock) is refused whole ('stale'), so an instance
-- that has already given a run up (self-fenced) never extends its lease; no lock wait may
-- carry a renewal past that validity either (lock_timeout, and the check again under each row
-- lock). Only pairs still held and leases not yet expired are renewed: an expired lease may
-- be swept any moment and must not come back to life. A connection that does not hold the
-- instance's session lock (a transaction pooler hands statements to any server connection)
-- is refused ('no_session'); an instance not registered under this key, 'unknown_instance'.
CREATE FUNCTION tandem_heartbeat_v1(
    p_instance text, p_key integer, p_lease interval, p_ids bigint[],
    p_fences bigint[], p_anchor timestamptz, p_valid_for interval,
    p_live_window interval)
RETURNS TABLE (outcome text, renewed bigint[], live integer, db_now timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
    remaining interval := p_anchor + p_valid_for - clock_timestamp();
BEGIN
    IF remaining <= interval '0' THEN
        RETURN QUERY SELECT 'stale', NULL::bigint[], NULL::integer, clock_timestamp();
        RETURN;
    END IF;
    PERFORM set_config('lock_timeout',
                       greatest(1, ceil(extract(epoch FROM remaining) * 1000))::text,
                       true);
    IF NOT EXISTS (SELECT FROM instance_sessions s
                   WHERE s.session_key = p_key AND s.pid = pg_backend_pid()) THEN
        RETURN QUERY SELECT 'no_session', NULL::bigint[], NULL::integer, clock_timestamp();
        RETURN;
    END IF;
    BEGIN
        WITH renewed AS (
            UPDATE tasks t SET lease_until = clock_timestamp() + p_lease
            FROM unnest(p_ids, p_fences) AS held(id, fence)
            WHERE t.id = held.id AND t.fence = held.fence AND t.is_running
              AND t.running_instance = p_instance
              AND t.lease_until > clock_timestamp()
              AND clock_timestamp() <= p_anchor + p_valid_for
            RETURNING t.id
        )
        SELECT coalesce(array_agg(renewed.id), '{}') INTO ids FROM renewed;
        -- Last: the instance's row is what its own claims update too.
        UPDATE instances i SET heartbeat_at = clock_timestamp(), status = 'active'
        WHERE i.id = p_instance AND i.session_key = p_key;
        IF NOT FOUND THEN
            RETURN QUERY SELECT 'unknown_instance', NULL::bigint[], NULL::integer,
                                clock_timestamp();
            RETURN;
        END IF;
    EXCEPTION WHEN lock_not_available THEN
        -- Held up past its validity: nothing renewed (the block is rolled back).
        RETURN QUERY SELECT 'stale', NULL::bigint[], NULL::integer, clock_timestamp();
        RETURN;
    END;
    RETURN QUERY SELECT 'renewed', ids, (
        SELECT count(*)::integer FROM instances i
        JOIN instance_sessions s ON s.session_key = i.session_key
        WHERE i.status = 'active' AND i.heartbeat_at > clock_timestamp() - p_live_window
    ), clock_timestamp();
END $$;
