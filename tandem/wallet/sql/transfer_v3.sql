-- tandem_transfer_v3: tandem_transfer_v2 with holds: the payer spends only its available
-- amount (balance - held), and the payer's expired holds never block a transfer. Run as the
-- owner (SECURITY DEFINER, its search_path pinned). A transfer in one round trip: both
-- users' rows locked, checked, updated, and journaled (the transfer and its two legs, signed
-- by the API key p_api_key).
--
-- The race it closes: two transfers in opposite directions at once (A->B and B->A) would
-- deadlock if each locked its payer first; both rows are locked in id order before anything
-- else (users before holds, as every path), so they queue on the first row instead. The
-- checks read the rows after the locks were granted (each statement of a volatile function
-- takes a new snapshot), so a hold made meanwhile is counted. Short while the payer holds
-- something, the payer's expired holds are released under the same lock
-- (tandem_release_expired_v1) and the check made again. A refusal is an outcome row, never
-- an error: 'from_not_found', 'to_not_found', 'insufficient_funds', or
-- 'balance_limit_exceeded' (the payee's balance would pass 9223372036854775807 =
-- tandem.wallet.models.INT64_MAX; the numeric sum cannot overflow). p_key, the idempotency
-- key, is unique in the journal per caller.
CREATE FUNCTION tandem_transfer_v3(
    p_from bigint, p_to bigint, p_amount bigint, p_reference text, p_key text,
    p_api_key bigint)
RETURNS TABLE (outcome text, transfer_id bigint, from_balance bigint,
               to_balance bigint, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    locked integer;
    from_now bigint;
    from_held bigint;
    to_now bigint;
    new_id bigint;
    made_at timestamptz;
BEGIN
    SELECT count(*) INTO locked FROM (
        SELECT 1 FROM users u WHERE u.id IN (p_from, p_to) ORDER BY u.id FOR UPDATE
    ) rows;
    SELECT u.balance, u.held INTO from_now, from_held FROM users u WHERE u.id = p_from;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'from_not_found', NULL::bigint, NULL::bigint, NULL::bigint,
                            NULL::timestamptz;
        RETURN;
    END IF;
    SELECT u.balance INTO to_now FROM users u WHERE u.id = p_to;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'to_not_found', NULL::bigint, NULL::bigint, NULL::bigint,
                            NULL::timestamptz;
        RETURN;
    END IF;
    IF from_now - from_held < p_amount AND from_held > 0
       AND (SELECT x.released_holds FROM tandem_release_expired_v1(p_from) x) > 0 THEN
        SELECT u.held INTO from_held FROM users u WHERE u.id = p_from;
    END IF;
    IF from_now - from_held < p_amount THEN
        RETURN QUERY SELECT 'insufficient_funds', NULL::bigint, from_now, to_now,
                            NULL::timestamptz;
        RETURN;
    END IF;
    IF to_now::numeric + p_amount > 9223372036854775807 THEN
        RETURN QUERY SELECT 'balance_limit_exceeded', NULL::bigint, from_now, to_now,
                            NULL::timestamptz;
        RETURN;
    END IF;
    INSERT INTO transfers
        (from_user_id, to_user_id, amount, reference, idempotency_key, api_key_id)
    VALUES (p_from, p_to, p_amount, p_reference, p_key, p_api_key)
    RETURNING transfers.id, transfers.created_at INTO new_id, made_at;
    UPDATE users u SET balance = u.balance - p_amount, updated_at = made_at
    WHERE u.id = p_from RETURNING u.balance INTO from_now;
    UPDATE users u SET balance = u.balance + p_amount, updated_at = made_at
    WHERE u.id = p_to RETURNING u.balance INTO to_now;
    INSERT INTO ledger_entries
        (user_id, amount, balance, kind, transfer_id, reference, created_at, api_key_id)
    VALUES (p_from, -p_amount, from_now, 'transfer', new_id, p_reference, made_at, p_api_key),
           (p_to, p_amount, to_now, 'transfer', new_id, p_reference, made_at, p_api_key);
    RETURN QUERY SELECT 'ok', new_id, from_now, to_now, made_at;
END $$;
