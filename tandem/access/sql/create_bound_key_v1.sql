-- tandem_create_bound_key_v1: a key bound to users, made on behalf of another key (POST /keys),
-- under rules the database keeps whoever calls it.
--
-- What it closes: the application's role could otherwise write any key it likes (an `all`
-- key, a key bound to nobody, one that never expires). Owned by the schema's owner and run
-- with its rights (SECURITY DEFINER, search_path pinned with pg_temp last), it makes only
-- what its rules allow: bound to at least one existing user, scopes within wallet:read and
-- wallet:write *and* within those of the calling key p_caller (read here by its id: live, not
-- expired, unbound, holding keys:write or all), an expiry of at most 24 hours. The caller's
-- row is locked (FOR SHARE) so that a revocation committing meanwhile waits for this key, and
-- the next reload then drops both. The token is made by the application; only its SHA-256
-- arrives here. A refusal is an outcome row, never an error: 'caller_not_allowed',
-- 'no_users', 'users_not_found', 'scope_outside_wallet', 'scope_beyond_caller',
-- 'expiry_out_of_range', 'name_taken'.
CREATE FUNCTION tandem_create_bound_key_v1(
    p_caller bigint, p_name text, p_token_sha256 bytea, p_scopes text[], p_users bigint[],
    p_expires_in interval)
RETURNS TABLE (outcome text, key_id bigint, expires_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    caller_scopes text[];
    bound_users bigint[];
    found_users integer;
    new_id bigint;
    until timestamptz;
BEGIN
    SELECT k.scopes INTO caller_scopes FROM api_keys k
    WHERE k.id = p_caller AND k.revoked_at IS NULL AND k.bound_user_ids IS NULL
      AND (k.expires_at IS NULL OR k.expires_at > clock_timestamp())
    FOR SHARE;
    IF NOT FOUND OR NOT caller_scopes && ARRAY['keys:write', 'all'] THEN
        RETURN QUERY SELECT 'caller_not_allowed', NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    SELECT array_agg(DISTINCT u ORDER BY u) INTO bound_users FROM unnest(p_users) u;
    IF bound_users IS NULL OR array_position(bound_users, NULL) IS NOT NULL THEN
        RETURN QUERY SELECT 'no_users', NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    SELECT count(*) INTO found_users FROM users WHERE id = ANY(bound_users);
    IF found_users <> cardinality(bound_users) THEN
        RETURN QUERY SELECT 'users_not_found', NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    IF p_scopes IS NULL OR cardinality(p_scopes) = 0
       OR NOT p_scopes <@ ARRAY['wallet:read', 'wallet:write'] THEN
        RETURN QUERY SELECT 'scope_outside_wallet', NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    IF NOT 'all' = ANY(caller_scopes) AND NOT p_scopes <@ caller_scopes THEN
        RETURN QUERY SELECT 'scope_beyond_caller', NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    IF p_expires_in IS NULL OR p_expires_in <= interval '0'
       OR p_expires_in > interval '24 hours' THEN
        RETURN QUERY SELECT 'expiry_out_of_range', NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    until := clock_timestamp() + p_expires_in;
    INSERT INTO api_keys (name, token_sha256, scopes, bound_user_ids, expires_at)
    VALUES (p_name, p_token_sha256,
            ARRAY(SELECT DISTINCT s FROM unnest(p_scopes) s ORDER BY s), bound_users, until)
    ON CONFLICT DO NOTHING
    RETURNING id INTO new_id;
    IF new_id IS NULL THEN
        RETURN QUERY SELECT 'name_taken', NULL::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    RETURN QUERY SELECT 'ok', new_id, until;
END
$$;
