-- tandem_create_user_v1: a new user and its opening entry (amount = balance = p_balance) in
-- one statement, run as the owner: the application's role may not insert users (whose
-- balance would be money with no entry) nor journal entries itself.
--
-- The race it closes: none; the invariant it keeps is that money is created only with its
-- journal entry, and an opening balance above 0 only under the daily mint ceiling
-- (tandem_mint_allowed_v1, counted in this backend's mint_usage row). A refusal is a row:
-- user_id NULL and refusal 'mint_ceiling'.
CREATE FUNCTION tandem_create_user_v1(p_balance bigint, p_api_key bigint)
RETURNS TABLE (user_id bigint, balance bigint, refusal text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH allowed AS (
        -- OR evaluates left to right: an opening balance of 0 never calls it.
        SELECT p_balance <= 0 OR tandem_mint_allowed_v1(p_balance) AS ok
    ), made AS (
        INSERT INTO users (balance) SELECT p_balance WHERE (SELECT a.ok FROM allowed a)
        RETURNING users.id, users.balance
    ), minted AS (
        INSERT INTO mint_usage AS m (day, backend, minted)
        SELECT (clock_timestamp() AT TIME ZONE 'UTC')::date, pg_backend_pid(), p_balance
        FROM made WHERE p_balance > 0
        ON CONFLICT (day, backend) DO UPDATE SET minted = m.minted + EXCLUDED.minted
    ), entry AS (
        INSERT INTO ledger_entries (user_id, amount, balance, kind, api_key_id)
        SELECT n.id, n.balance, n.balance, 'opening', p_api_key FROM made n
    )
    SELECT n.id, n.balance, NULL::text FROM made n
    UNION ALL
    SELECT NULL::bigint, NULL::bigint, 'mint_ceiling' WHERE NOT (SELECT a.ok FROM allowed a);
END $$;
