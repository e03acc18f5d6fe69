-- tandem_open_session_v1: a new database session for an instance, as the proof it lives.
--
-- The race it closes: a killed process's runs must be recorded lost in milliseconds, not
-- after their lease. The instance takes a new key and holds a session-level advisory lock on
-- it ((2053963779 = tandem.core.locks.SESSIONS, key), read back by the instance_sessions
-- view) on its direct heartbeat connection: the lock lives exactly as long as that session,
-- which the kernel ends as soon as the process dies. A new session (after a reconnect) takes
-- a new key, so a lingering old session can never vouch for the new one. The server drops a
-- silent client's session no sooner than a lease after its last packet (TCP user timeout
-- and keepalives of this session only): until then the session vouches for a partitioned
-- instance, whose runs its lease and self-fencing protect. No row: not registered
-- (forgotten), the caller registers first.
CREATE FUNCTION tandem_open_session_v1(p_instance text, p_lease interval)
RETURNS TABLE (session_key integer, db_now timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    key integer;
    lease_s integer := ceil(extract(epoch FROM p_lease));
BEGIN
    UPDATE instances i SET session_key = nextval('instance_session_keys')
    WHERE i.id = p_instance RETURNING i.session_key INTO key;
    IF key IS NULL THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_lock(2053963779, key);  -- a new key: never waits
    PERFORM set_config('tcp_user_timeout', (lease_s * 1000)::text, false);
    PERFORM set_config('tcp_keepalives_idle', lease_s::text, false);
    PERFORM set_config('tcp_keepalives_interval',
                       greatest(1, ceil(lease_s / 3.0))::text, false);
    PERFORM set_config('tcp_keepalives_count', '3', false);
    RETURN QUERY SELECT key, clock_timestamp();
END $$;
