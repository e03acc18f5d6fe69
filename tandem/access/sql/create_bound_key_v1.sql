-- tandem_create_bound_key_v1: a key bound to users, made on behalf of another key (POST /keys),
-- under rules the database keeps whoever calls it.
--
-- What it closes: the application's role could otherwise write any key it likes (an `all`
-- key, a key bound to nobody, one that never expires, one without its maker's limits). Owned
-- by the schema's owner and run with its rights (SECURITY DEFINER, search_path pinned with
-- pg_temp last; the builtins applied to the arguments named in pg_catalog, so no object of
-- the caller's can stand in for one), it makes only what its rules allow: a name of the
-- CLI's pattern (keys.NAME_RE), bound to 1..100 existing users (schemas.BOUND_KEY_MAX_USERS),
-- scopes within wallet:read and wallet:write *and* within those of the calling key p_caller
-- (read here by its id: live, not expired, unbound, holding keys:write or all), an expiry of
-- at most 24 hours and never after the caller's own, and the caller's limits (debits per
-- minute, hour and day, and its rate) copied, with the maker as its parent (parent_key_id:
-- its debits and requests count in its maker's windows, so minting keys multiplies nothing):
-- a key is never less limited than its maker.
-- The caller's row is locked (FOR SHARE) so that a revocation committing meanwhile waits for
-- this key, and the next reload then drops both. The token is made by the application; only
-- its SHA-256 arrives here. A refusal is an outcome row, never an error: 'caller_not_allowed',
-- 'name_invalid', 'no_users', 'too_many_users', 'users_not_found', 'scope_outside_wallet',
-- 'scope_beyond_caller', 'expiry_out_of_range', 'name_taken', 'token_taken'.
CREATE FUNCTION tandem_create_bound_key_v1(
    p_caller bigint, p_name text, p_token_sha256 bytea, p_scopes text[], p_users bigint[],
    p_expires_in interval)
RETURNS TABLE (outcome text, key_id bigint, expires_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    caller api_keys%ROWTYPE;
    bound_users bigint[];
    found_users integer;
    new_id bigint;
    until timestamptz;
BEGIN
    SELECT k.* INTO caller FROM api_keys k
    WHERE k.id = p_caller AND k.revoked_at IS NULL AND k.bound_user_ids IS NULL
      AND (k.expires_at IS NULL OR k.expires_at > pg_catalog.clock_timestamp())
    FOR SHARE;
    IF NOT FOUND OR NOT caller.scopes OPERATOR(pg_catalog.&&) ARRAY['keys:write', 'all'] THEN
        RETURN QUERY SELECT 'caller_not_allowed', NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    IF p_name IS NULL
       OR NOT p_name OPERATOR(pg_catalog.~) '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$' THEN
        RETURN QUERY SELECT 'name_invalid', NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    SELECT pg_catalog.array_agg(DISTINCT u ORDER BY u) INTO bound_users
    FROM pg_catalog.unnest(p_users) u;
    IF bound_users IS NULL OR pg_catalog.array_position(bound_users, NULL) IS NOT NULL THEN
        RETURN QUERY SELECT 'no_users', NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    IF pg_catalog.cardinality(bound_users) > 100 THEN
        RETURN QUERY SELECT 'too_many_users', NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    SELECT pg_catalog.count(*) INTO found_users FROM users
    WHERE id OPERATOR(pg_catalog.=) ANY(bound_users);
    IF found_users <> pg_catalog.cardinality(bound_users) THEN
        RETURN QUERY SELECT 'users_not_found', NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    IF p_scopes IS NULL OR pg_catalog.cardinality(p_scopes) = 0
       OR NOT p_scopes OPERATOR(pg_catalog.<@) ARRAY['wallet:read', 'wallet:write'] THEN
        RETURN QUERY SELECT 'scope_outside_wallet', NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    IF NOT 'all' OPERATOR(pg_catalog.=) ANY(caller.scopes)
       AND NOT p_scopes OPERATOR(pg_catalog.<@) caller.scopes THEN
        RETURN QUERY SELECT 'scope_beyond_caller', NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    IF p_expires_in IS NULL OR p_expires_in OPERATOR(pg_catalog.<=) interval '0'
       OR p_expires_in OPERATOR(pg_catalog.>) interval '24 hours' THEN
        RETURN QUERY SELECT 'expiry_out_of_range', NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    -- Never after the caller's own expiry.
    until := LEAST(pg_catalog.clock_timestamp() OPERATOR(pg_catalog.+) p_expires_in,
                   caller.expires_at);  -- LEAST is syntax; NULLs ignored
    INSERT INTO api_keys (name, token_sha256, scopes, bound_user_ids, expires_at,
                          debit_per_minute, debit_per_hour, debit_per_day,
                          rate_requests, rate_seconds, parent_key_id)
    VALUES (p_name, p_token_sha256,
            ARRAY(SELECT DISTINCT s FROM pg_catalog.unnest(p_scopes) s ORDER BY s), bound_users,
            until, caller.debit_per_minute, caller.debit_per_hour, caller.debit_per_day,
            caller.rate_requests, caller.rate_seconds, caller.id)
    ON CONFLICT DO NOTHING
    RETURNING id INTO new_id;
    IF new_id IS NULL THEN
        -- A name taken is the client's to change; a token taken is the application's fault
        -- (a 256-bit token does not collide by chance), never reported as the name's.
        IF EXISTS (SELECT FROM api_keys WHERE name OPERATOR(pg_catalog.=) p_name) THEN
            RETURN QUERY SELECT 'name_taken', NULL::bigint, NULL::timestamptz;
        ELSE
            RETURN QUERY SELECT 'token_taken', NULL::bigint, NULL::timestamptz;
        END IF;
        RETURN;
    END IF;
    RETURN QUERY SELECT 'ok', new_id, until;
END
$$;
