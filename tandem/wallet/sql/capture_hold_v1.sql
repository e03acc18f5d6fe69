-- tandem_capture_hold_v1: the one capture of a hold: p_amount of it (NULL: all) leaves the
-- payer, as a transfer to the payee (the hold's, or p_to when the hold has none) or, with no
-- payee, as a withdrawal; the rest is released in the same step. Run as the owner.
--
-- The race it closes: a capture racing a release, another capture or the expiry of the same
-- hold. Every change of a hold's state is made under its payer's row lock, users' rows are
-- locked before holds' (payer and payee in id order, as a transfer locks them: no deadlock),
-- and the hold is then locked and its state read after the locks were granted: exactly one
-- of them changes an active hold, the others see what it became. A hold is captured only
-- before its expires_at by the database clock; at or after it, it is marked 'expired' here
-- (released) and the outcome is 'hold_not_active' with status 'expired': never both. The
-- journal entries (two 'transfer' legs, or one 'withdrawal') carry the hold's id. Refusals,
-- each an outcome row and never an error: 'hold_not_found', 'hold_not_active' (status:
-- captured, released or expired), 'payee_already_set', 'payee_is_payer', 'to_not_found',
-- 'amount_exceeds_hold', 'balance_limit_exceeded' (the payee's balance would pass
-- 9223372036854775807). p_key, the idempotency key, is unique on the events per caller.
CREATE FUNCTION tandem_capture_hold_v1(
    p_hold bigint, p_amount bigint, p_to bigint, p_key text, p_api_key bigint)
RETURNS TABLE (outcome text, status text, transfer_id bigint, entry_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_payer bigint;
    v_payee bigint;
    v_given_payee bigint;
    v_hold_amount bigint;
    v_status text;
    v_expires timestamptz;
    v_reference text;
    v_amount bigint;
    v_payee_balance bigint;
    v_payer_balance bigint;
    v_transfer bigint;
    v_entry bigint;
    v_now timestamptz;
    locked integer;
BEGIN
    -- Who pays and who is paid never change once set: read before any lock.
    SELECT h.user_id, h.to_user_id INTO v_payer, v_given_payee FROM holds h WHERE h.id = p_hold;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'hold_not_found', NULL::text, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    v_payee := coalesce(v_given_payee, p_to);
    SELECT count(*) INTO locked FROM (
        SELECT 1 FROM users u WHERE u.id IN (v_payer, v_payee) ORDER BY u.id FOR UPDATE
    ) rows;
    SELECT h.status, h.expires_at, h.amount, h.reference
    INTO v_status, v_expires, v_hold_amount, v_reference
    FROM holds h WHERE h.id = p_hold FOR UPDATE;
    v_now := clock_timestamp();
    IF v_status = 'active' AND v_expires <= v_now THEN
        UPDATE holds h SET status = 'expired', finished_at = v_now WHERE h.id = p_hold;
        INSERT INTO hold_events (hold_id, kind, amount, created_at)
        VALUES (p_hold, 'expired', v_hold_amount, v_now);
        UPDATE users u SET held = u.held - v_hold_amount, updated_at = v_now
        WHERE u.id = v_payer;
        v_status := 'expired';
    END IF;
    IF v_status <> 'active' THEN
        RETURN QUERY SELECT 'hold_not_active', v_status, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    IF p_to IS NOT NULL AND v_given_payee IS NOT NULL THEN
        RETURN QUERY SELECT 'payee_already_set', v_status, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    IF p_to = v_payer THEN
        RETURN QUERY SELECT 'payee_is_payer', v_status, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    v_amount := coalesce(p_amount, v_hold_amount);
    IF v_amount > v_hold_amount THEN
        RETURN QUERY SELECT 'amount_exceeds_hold', v_status, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    IF v_payee IS NOT NULL THEN
        SELECT u.balance INTO v_payee_balance FROM users u WHERE u.id = v_payee;
        IF NOT FOUND THEN
            RETURN QUERY SELECT 'to_not_found', v_status, NULL::bigint, NULL::bigint;
            RETURN;
        END IF;
        IF v_payee_balance::numeric + v_amount > 9223372036854775807 THEN
            RETURN QUERY SELECT 'balance_limit_exceeded', v_status, NULL::bigint, NULL::bigint;
            RETURN;
        END IF;
    END IF;
    UPDATE holds h SET status = 'captured', captured_amount = v_amount, finished_at = v_now,
                       to_user_id = v_payee
    WHERE h.id = p_hold;
    INSERT INTO hold_events (hold_id, kind, amount, api_key_id, idempotency_key, created_at)
    VALUES (p_hold, 'captured', v_amount, p_api_key, p_key, v_now);
    IF v_amount < v_hold_amount THEN
        INSERT INTO hold_events (hold_id, kind, amount, api_key_id, created_at)
        VALUES (p_hold, 'released', v_hold_amount - v_amount, p_api_key, v_now);
    END IF;
    UPDATE users u SET balance = u.balance - v_amount, held = u.held - v_hold_amount,
                       updated_at = v_now
    WHERE u.id = v_payer RETURNING u.balance INTO v_payer_balance;
    IF v_payee IS NOT NULL THEN
        INSERT INTO transfers (from_user_id, to_user_id, amount, reference, api_key_id, created_at)
        VALUES (v_payer, v_payee, v_amount, v_reference, p_api_key, v_now)
        RETURNING transfers.id INTO v_transfer;
        UPDATE users u SET balance = u.balance + v_amount, updated_at = v_now
        WHERE u.id = v_payee RETURNING u.balance INTO v_payee_balance;
        INSERT INTO ledger_entries (user_id, amount, balance, kind, transfer_id, reference,
                                    created_at, api_key_id, hold_id)
        VALUES (v_payer, -v_amount, v_payer_balance, 'transfer', v_transfer, v_reference, v_now,
                p_api_key, p_hold)
        RETURNING ledger_entries.id INTO v_entry;
        INSERT INTO ledger_entries (user_id, amount, balance, kind, transfer_id, reference,
                                    created_at, api_key_id, hold_id)
        VALUES (v_payee, v_amount, v_payee_balance, 'transfer', v_transfer, v_reference, v_now,
                p_api_key, p_hold);
    ELSE
        INSERT INTO ledger_entries (user_id, amount, balance, kind, reference, created_at,
                                    api_key_id, hold_id)
        VALUES (v_payer, -v_amount, v_payer_balance, 'withdrawal', v_reference, v_now,
                p_api_key, p_hold)
        RETURNING ledger_entries.id INTO v_entry;
    END IF;
    RETURN QUERY SELECT 'ok', 'captured'::text, v_transfer, v_entry;
END $$;
