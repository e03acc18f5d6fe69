-- tandem_end_session_v1: a logout, ending the live browser session with this token hash.
--
-- What it closes: with UPDATE on browser_sessions the application's role could set ended_at
-- back to NULL and revive a session its person had ended (or push its expiry out). Run as
-- the owner (SECURITY DEFINER, search_path pinned with pg_temp last), it only ever ends a
-- session: a session ended stays ended. Returns whether a live session was ended.
CREATE FUNCTION tandem_end_session_v1(p_session_sha256 bytea)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE browser_sessions SET ended_at = pg_catalog.clock_timestamp()
    WHERE token_sha256 OPERATOR(pg_catalog.=) p_session_sha256 AND ended_at IS NULL;
    RETURN FOUND;
END
$$;
