-- tandem_transfer_batch_v1: a batch of transfers into one payee (a fee account credited by
-- every sale), in the order given (the order they arrived in: wallet/batching.py), in one
-- statement: one lock of each row and one commit for the lot. Each transfer is decided as
-- tandem_transfer_v3 decides it alone, on the balances the transfers before it left: the
-- payer spends only its available amount (its expired holds released first when they are
-- in the way), the payee never passes 2^63-1. Each one made is a transfer row and its two
-- legs, the payee's leg with the payee's balance after it. Returns one row per transfer, in
-- order, as tandem_transfer_v3 returns its one row ('ok', 'from_not_found', 'to_not_found',
-- 'insufficient_funds', 'balance_limit_exceeded').
--
-- The race it closes: every row the batch touches (the payers and the payee) is locked once,
-- in id order, before anything else, as every path locks users (tandem_transfer_v3 locks its
-- two in id order): two batches, or a batch and single transfers in any directions, queue on
-- their first common row instead of deadlocking. The payee's balance is carried from item to
-- item and written once at the end (the CHECKs see only the final state; the arithmetic
-- before it is this function's own, in numeric). A payer listed twice sees its first
-- transfer's debit (each statement of a volatile function reads the newest row). A payer
-- that is the payee is refused by the transfers row's CHECK (ck_transfers_two_users) before
-- any balance moves, which rolls the batch back (its transfers are then sent alone).
CREATE FUNCTION tandem_transfer_batch_v1(
    p_to bigint, p_froms bigint[], p_amounts bigint[], p_references text[],
    p_api_keys bigint[])
RETURNS TABLE (outcome text, transfer_id bigint, from_balance bigint,
               to_balance bigint, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    locked integer;
    from_now bigint;
    from_held bigint;
    to_now numeric;
    to_start numeric;
    v_from bigint;
    v_amount bigint;
    new_id bigint;
    made_at timestamptz;
BEGIN
    SELECT count(*) INTO locked FROM (
        SELECT 1 FROM users u WHERE u.id = ANY (p_froms || p_to) ORDER BY u.id FOR UPDATE
    ) rows;
    SELECT u.balance INTO to_now FROM users u WHERE u.id = p_to;
    IF NOT FOUND THEN
        -- As tandem_transfer_v3 answers each alone: a missing payer is named first.
        RETURN QUERY
            SELECT CASE WHEN EXISTS (SELECT FROM users u WHERE u.id = f.id)
                        THEN 'to_not_found' ELSE 'from_not_found' END,
                   NULL::bigint, NULL::bigint, NULL::bigint, NULL::timestamptz
            FROM unnest(p_froms) WITH ORDINALITY AS f(id, ord)
            ORDER BY f.ord;
        RETURN;
    END IF;
    to_start := to_now;
    FOR i IN 1 .. coalesce(cardinality(p_froms), 0) LOOP
        v_from := p_froms[i];
        v_amount := p_amounts[i];
        SELECT u.balance, u.held INTO from_now, from_held FROM users u WHERE u.id = v_from;
        IF NOT FOUND THEN
            RETURN QUERY SELECT 'from_not_found', NULL::bigint, NULL::bigint, NULL::bigint,
                                NULL::timestamptz;
            CONTINUE;
        END IF;
        IF from_now - from_held < v_amount AND from_held > 0
           AND (SELECT x.released_holds FROM tandem_release_expired_v1(v_from) x) > 0 THEN
            SELECT u.held INTO from_held FROM users u WHERE u.id = v_from;
        END IF;
        IF from_now - from_held < v_amount THEN
            RETURN QUERY SELECT 'insufficient_funds', NULL::bigint, from_now, to_now::bigint,
                                NULL::timestamptz;
            CONTINUE;
        END IF;
        IF to_now + v_amount > 9223372036854775807 THEN
            RETURN QUERY SELECT 'balance_limit_exceeded', NULL::bigint, from_now,
                                to_now::bigint, NULL::timestamptz;
            CONTINUE;
        END IF;
        INSERT INTO transfers
            (from_user_id, to_user_id, amount, reference, idempotency_key, api_key_id)
        VALUES (v_from, p_to, v_amount, p_references[i], NULL, p_api_keys[i])
        RETURNING transfers.id, transfers.created_at INTO new_id, made_at;
        UPDATE users u SET balance = u.balance - v_amount, updated_at = made_at
        WHERE u.id = v_from RETURNING u.balance INTO from_now;
        to_now := to_now + v_amount;
        INSERT INTO ledger_entries
            (user_id, amount, balance, kind, transfer_id, reference, created_at, api_key_id)
        VALUES (v_from, -v_amount, from_now, 'transfer', new_id, p_references[i], made_at,
                p_api_keys[i]),
               (p_to, v_amount, to_now::bigint, 'transfer', new_id, p_references[i], made_at,
                p_api_keys[i]);
        RETURN QUERY SELECT 'ok', new_id, from_now, to_now::bigint, made_at;
    END LOOP;
    IF to_now <> to_start THEN
        UPDATE users u SET balance = to_now::bigint, updated_at = made_at WHERE u.id = p_to;
    END IF;
END $$;
