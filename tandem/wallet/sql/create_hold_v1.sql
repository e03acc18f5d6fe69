-- tandem_create_hold_v1: a hold (a reservation of p_amount of p_user's available amount,
-- for p_expires_in seconds of the database clock, for the payee p_to if given) and its
-- 'created' event, run as the owner: the application's role may write neither holds nor
-- users.held itself.
--
-- The race it closes: the reservation is one conditional UPDATE (held + p_amount, only
-- while balance - held >= p_amount) that takes the payer's row lock; under READ COMMITTED
-- PostgreSQL re-checks the condition on the newest row version after waiting for the lock,
-- so concurrent holds, withdrawals and transfers of one user serialise on its row and can
-- never together reserve or spend more than the balance (any number of instances). Refused
-- while the payer holds something, its expired holds are released under the same lock
-- (tandem_release_expired_v1) and the reservation tried once more. A payee with a lower id
-- is locked (FOR KEY SHARE, the hold's foreign key) before the payer, so the users' rows are
-- always taken in id order: no deadlock with a transfer between the two. Until the operator
-- enables holds (wallet_settings.holds_enabled: migration 0017, once no instance of an
-- earlier release, which ignores held, is live) the outcome is 'holds_unavailable'. Other
-- refusals, each an outcome row and never an error: 'user_not_found', 'to_not_found',
-- 'payee_is_payer', 'insufficient_funds' (with the available amount). p_key, the
-- idempotency key, is unique on holds per caller (p_api_key, who signs the hold).
CREATE FUNCTION tandem_create_hold_v1(
    p_user bigint, p_to bigint, p_amount bigint, p_expires_in integer, p_reference text,
    p_key text, p_api_key bigint)
RETURNS TABLE (outcome text, hold_id bigint, expires_at timestamptz, created_at timestamptz,
               available bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_available bigint;
    v_held bigint;
    v_id bigint;
    v_created timestamptz;
    v_expires timestamptz;
BEGIN
    IF NOT coalesce((SELECT s.holds_enabled FROM wallet_settings s), false) THEN
        RETURN QUERY SELECT 'holds_unavailable', NULL::bigint, NULL::timestamptz,
                            NULL::timestamptz, NULL::bigint;
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT FROM users u WHERE u.id = p_user) THEN
        RETURN QUERY SELECT 'user_not_found', NULL::bigint, NULL::timestamptz,
                            NULL::timestamptz, NULL::bigint;
        RETURN;
    END IF;
    IF p_to = p_user THEN
        RETURN QUERY SELECT 'payee_is_payer', NULL::bigint, NULL::timestamptz,
                            NULL::timestamptz, NULL::bigint;
        RETURN;
    END IF;
    IF p_to IS NOT NULL THEN
        IF p_to < p_user THEN
            PERFORM 1 FROM users u WHERE u.id = p_to FOR KEY SHARE;
        ELSE
            PERFORM 1 FROM users u WHERE u.id = p_to;
        END IF;
        IF NOT FOUND THEN
            RETURN QUERY SELECT 'to_not_found', NULL::bigint, NULL::timestamptz,
                                NULL::timestamptz, NULL::bigint;
            RETURN;
        END IF;
    END IF;
    FOR attempt IN 1..2 LOOP
        UPDATE users u SET held = u.held + p_amount, updated_at = clock_timestamp()
        WHERE u.id = p_user AND u.balance - u.held >= p_amount
        RETURNING u.balance - u.held INTO v_available;
        EXIT WHEN FOUND;
        SELECT u.balance - u.held, u.held INTO v_available, v_held FROM users u
        WHERE u.id = p_user;
        IF attempt = 2 OR v_held = 0
           OR (SELECT x.released_holds FROM tandem_release_expired_v1(p_user) x) = 0 THEN
            RETURN QUERY SELECT 'insufficient_funds', NULL::bigint, NULL::timestamptz,
                                NULL::timestamptz, v_available;
            RETURN;
        END IF;
    END LOOP;
    v_created := clock_timestamp();
    v_expires := v_created + make_interval(secs => p_expires_in);
    INSERT INTO holds (user_id, to_user_id, amount, status, expires_at, created_at, reference,
                       idempotency_key, api_key_id, available_after)
    VALUES (p_user, p_to, p_amount, 'active', v_expires, v_created, p_reference, p_key,
            p_api_key, v_available)
    RETURNING holds.id INTO v_id;
    -- The key is the hold's (the events' keys are those of captures and releases).
    INSERT INTO hold_events (hold_id, kind, amount, api_key_id, created_at)
    VALUES (v_id, 'created', p_amount, p_api_key, v_created);
    RETURN QUERY SELECT 'ok', v_id, v_expires, v_created, v_available;
END $$;
