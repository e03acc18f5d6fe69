-- tandem_apply_delta_v2: tandem_apply_delta_v1 with holds: a withdrawal spends only the
-- available amount (balance - held), and a user's expired holds never block it.
--
-- The race it closes: as v1's, the UPDATE takes the user's row lock, and under READ
-- COMMITTED PostgreSQL re-checks the WHERE (now balance + amount >= held) on the newest row
-- version after waiting for it, so concurrent withdrawals and holds never spend more than
-- the balance together; the entry is written under that lock with the balance after it. A
-- withdrawal refused while the user holds something (held > 0) releases the user's expired
-- holds (tandem_release_expired_v1, under the same row lock) and, if any were, is tried once
-- more: an expired hold is released by the very request it would block, even while the
-- expiry task is behind. A user without holds pays v1's one statement. Otherwise v1: the
-- change applies only when the result fits 0..9223372036854775807 and, for a deposit, under
-- the daily mint ceiling; a refusal is a row (applied false, refusal 'mint_ceiling' when the
-- ceiling refused it); no row at all: no such user. p_key, the idempotency key, is unique in
-- the journal per caller (p_api_key, who signs the entry).
CREATE FUNCTION tandem_apply_delta_v2(
    p_user bigint, p_amount bigint, p_reference text, p_key text, p_api_key bigint)
RETURNS TABLE (balance bigint, applied boolean, entry_id bigint, refusal text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_balance bigint;
    v_applied boolean;
    v_entry bigint;
    v_refusal text;
    v_held bigint;
BEGIN
    FOR attempt IN 1..2 LOOP
        WITH allowed AS (
            -- OR evaluates left to right: a withdrawal never calls it.
            SELECT p_amount <= 0 OR tandem_mint_allowed_v1(p_amount) AS ok
        ), updated AS (
            UPDATE users u SET balance = u.balance + p_amount, updated_at = clock_timestamp()
            WHERE u.id = p_user
              AND (u.balance::numeric + p_amount) BETWEEN u.held AND 9223372036854775807
              AND (SELECT a.ok FROM allowed a)
            RETURNING u.id, u.balance
        ), minted AS (
            INSERT INTO mint_usage AS m (day, backend, minted)
            SELECT (clock_timestamp() AT TIME ZONE 'UTC')::date, pg_backend_pid(), p_amount
            FROM updated WHERE p_amount > 0
            ON CONFLICT (day, backend) DO UPDATE SET minted = m.minted + EXCLUDED.minted
        ), entry AS (
            INSERT INTO ledger_entries
                (user_id, amount, balance, kind, reference, idempotency_key, api_key_id)
            SELECT d.id, p_amount, d.balance,
                   CASE WHEN p_amount > 0 THEN 'deposit' ELSE 'withdrawal' END,
                   p_reference, p_key, p_api_key
            FROM updated d
            RETURNING ledger_entries.id
        )
        SELECT r.balance, r.applied, r.entry_id, r.refusal, r.held
        INTO v_balance, v_applied, v_entry, v_refusal, v_held
        FROM (
            SELECT d.balance, true AS applied, (SELECT e.id FROM entry e) AS entry_id,
                   NULL::text AS refusal, 0::bigint AS held
            FROM updated d
            UNION ALL
            SELECT u.balance, false, NULL::bigint,
                   CASE WHEN NOT (SELECT a.ok FROM allowed a) THEN 'mint_ceiling' END, u.held
            FROM users u WHERE u.id = p_user AND NOT EXISTS (SELECT FROM updated)
        ) r;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        EXIT WHEN v_applied OR p_amount > 0 OR v_held = 0 OR attempt = 2;
        EXIT WHEN (SELECT x.released_holds FROM tandem_release_expired_v1(p_user) x) = 0;
    END LOOP;
    RETURN QUERY SELECT v_balance, v_applied, v_entry, v_refusal;
END $$;
