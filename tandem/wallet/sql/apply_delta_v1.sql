-- tandem_apply_delta_v1: a balance change and its journal entry in one statement, run as the
-- owner (the application's role may not write users or ledger_entries itself).
--
-- The race it closes: the UPDATE takes the user's row lock, and under READ COMMITTED
-- PostgreSQL re-checks the WHERE on the newest row version after waiting for it, so
-- concurrent changes serialise on the row with no lost update; the entry is written under
-- that lock with the balance after it, so a user's entries are in the order of its changes.
-- The change applies only when the result fits 0..9223372036854775807 (the numeric sum cannot
-- overflow) and, for a deposit, under the daily mint ceiling (tandem_mint_allowed_v1, counted
-- in this backend's mint_usage row). A refusal is a row, never an error: applied false, with
-- refusal 'mint_ceiling' when the ceiling refused it; no row at all: no such user. p_key, the
-- idempotency key, is unique in the journal per caller (p_api_key, who signs the entry).
-- One statement in PL/pgSQL (not a SQL function): its plan is cached per session.
CREATE FUNCTION tandem_apply_delta_v1(
    p_user bigint, p_amount bigint, p_reference text, p_key text, p_api_key bigint)
RETURNS TABLE (balance bigint, applied boolean, entry_id bigint, refusal text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH allowed AS (
        -- OR evaluates left to right: a withdrawal never calls it.
        SELECT p_amount <= 0 OR tandem_mint_allowed_v1(p_amount) AS ok
    ), updated AS (
        UPDATE users u SET balance = u.balance + p_amount, updated_at = clock_timestamp()
        WHERE u.id = p_user AND (u.balance::numeric + p_amount) BETWEEN 0 AND 9223372036854775807
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
    SELECT d.balance, true, (SELECT e.id FROM entry e), NULL::text FROM updated d
    UNION ALL
    SELECT u.balance, false, NULL::bigint,
           CASE WHEN NOT (SELECT a.ok FROM allowed a) THEN 'mint_ceiling' END
    FROM users u WHERE u.id = p_user AND NOT EXISTS (SELECT FROM updated);
END $$;
