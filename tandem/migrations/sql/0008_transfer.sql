-- tandem_transfer as migration 0008 made it (replaced by 0009's, which takes the API key):
-- what 0009's downgrade restores. Its text is 0008's, byte for byte, so the restored
-- function is the one a database upgraded to 0008 has (the step-wise downgrade test
-- compares them).

        CREATE FUNCTION tandem_transfer(
            p_from bigint, p_to bigint, p_amount bigint, p_reference text, p_key text)
        RETURNS TABLE (outcome text, transfer_id bigint, from_balance bigint,
                       to_balance bigint, created_at timestamptz)
        LANGUAGE plpgsql AS $$
        DECLARE
            locked integer;
            from_now bigint;
            to_now bigint;
            new_id bigint;
            made_at timestamptz;
        BEGIN
            -- Both rows, in id order, before anything else: the fixed order is what makes
            -- A->B and B->A at once queue instead of deadlock.
            SELECT count(*) INTO locked FROM (
                SELECT 1 FROM users u WHERE u.id IN (p_from, p_to) ORDER BY u.id FOR UPDATE
            ) rows;
            SELECT u.balance INTO from_now FROM users u WHERE u.id = p_from;
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
            IF from_now < p_amount THEN
                RETURN QUERY SELECT 'insufficient_funds', NULL::bigint, from_now, to_now,
                                    NULL::timestamptz;
                RETURN;
            END IF;
            IF to_now::numeric + p_amount > 9223372036854775807 THEN
                RETURN QUERY SELECT 'balance_limit_exceeded', NULL::bigint, from_now, to_now,
                                    NULL::timestamptz;
                RETURN;
            END IF;
            INSERT INTO transfers (from_user_id, to_user_id, amount, reference, idempotency_key)
            VALUES (p_from, p_to, p_amount, p_reference, p_key)
            RETURNING transfers.id, transfers.created_at INTO new_id, made_at;
            UPDATE users u SET balance = u.balance - p_amount, updated_at = made_at
            WHERE u.id = p_from RETURNING u.balance INTO from_now;
            UPDATE users u SET balance = u.balance + p_amount, updated_at = made_at
            WHERE u.id = p_to RETURNING u.balance INTO to_now;
            INSERT INTO ledger_entries
                (user_id, amount, balance, kind, transfer_id, reference, created_at)
            VALUES (p_from, -p_amount, from_now, 'transfer', new_id, p_reference, made_at),
                   (p_to, p_amount, to_now, 'transfer', new_id, p_reference, made_at);
            RETURN QUERY SELECT 'ok', new_id, from_now, to_now, made_at;
        END $$
