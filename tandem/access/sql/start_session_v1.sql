-- tandem_start_session_v1: a browser session, started at login from the API key typed in the
-- login form.
--
-- What it closes: with INSERT on browser_sessions the application's role could write a
-- session, with a token hash it chose, for any live key (the `all` bootstrap key included),
-- and its cookie would then act as that key. Run as the owner (SECURITY DEFINER, search_path
-- pinned with pg_temp last, the builtins applied to the arguments named in pg_catalog), it
-- takes the raw API token, hashes it here, and starts a session only for the live key (not
-- revoked, not expired) with that hash: whoever calls it must hold the key itself, as the
-- person logging in does. The session lasts p_seconds, at most 12 hours
-- (sessions.COOKIE_MAX_AGE). Returns the key's id, or NULL (no live key has this token, or
-- p_seconds is out of range): nothing is written then. The session token's hash is unique
-- (a second login with the same one fails on the unique constraint).
CREATE FUNCTION tandem_start_session_v1(
    p_key_token text, p_session_sha256 bytea, p_seconds integer)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    found_key bigint;
    started timestamptz;
BEGIN
    IF p_key_token IS NULL OR p_session_sha256 IS NULL OR p_seconds IS NULL
       OR p_seconds OPERATOR(pg_catalog.<) 1 OR p_seconds OPERATOR(pg_catalog.>) 43200 THEN
        RETURN NULL;
    END IF;
    SELECT k.id INTO found_key FROM api_keys k
    WHERE k.token_sha256 OPERATOR(pg_catalog.=)
          pg_catalog.sha256(pg_catalog.convert_to(p_key_token, 'UTF8'))
      AND k.revoked_at IS NULL
      AND (k.expires_at IS NULL OR k.expires_at > pg_catalog.clock_timestamp());
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    started := pg_catalog.clock_timestamp();  -- once: the life is exactly p_seconds
    INSERT INTO browser_sessions (token_sha256, api_key_id, created_at, expires_at)
    VALUES (p_session_sha256, found_key, started,
            started OPERATOR(pg_catalog.+) pg_catalog.make_interval(secs => p_seconds));
    RETURN found_key;
END
$$;
