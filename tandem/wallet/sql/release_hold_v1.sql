-- tandem_release_hold_v1: gives a hold's amount back to its payer's available amount. Run
-- as the owner. Releasing a released hold answers 'ok' and 'released' again; an expired one
-- (marked so by the expiry, or active with its expires_at reached, marked 'expired' here)
-- 'ok' and 'expired'; a captured one 'hold_not_active'; 'hold_not_found'.
--
-- The race it closes: a release racing a capture, another release or the expiry of the same
-- hold: the payer's row is locked first (users before holds, as every path), then the hold,
-- and its state read after both locks were granted: exactly one of them changes an active
-- hold. p_key, the idempotency key, is unique on the events per caller (p_api_key, who
-- signs the event).
CREATE FUNCTION tandem_release_hold_v1(p_hold bigint, p_key text, p_api_key bigint)
RETURNS TABLE (outcome text, status text)
LANGUAGE plpgsql AS $$
DECLARE
    v_payer bigint;
    v_status text;
    v_expires timestamptz;
    v_amount bigint;
    v_kind text;
    v_now timestamptz;
BEGIN
    SELECT h.user_id INTO v_payer FROM holds h WHERE h.id = p_hold;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'hold_not_found', NULL::text;
        RETURN;
    END IF;
    PERFORM 1 FROM users u WHERE u.id = v_payer FOR UPDATE;
    SELECT h.status, h.expires_at, h.amount INTO v_status, v_expires, v_amount
    FROM holds h WHERE h.id = p_hold FOR UPDATE;
    IF v_status = 'captured' THEN
        RETURN QUERY SELECT 'hold_not_active', v_status;
        RETURN;
    END IF;
    IF v_status <> 'active' THEN
        RETURN QUERY SELECT 'ok', v_status;
        RETURN;
    END IF;
    v_now := clock_timestamp();
    v_kind := CASE WHEN v_expires <= v_now THEN 'expired' ELSE 'released' END;
    UPDATE holds h SET status = v_kind, finished_at = v_now WHERE h.id = p_hold;
    INSERT INTO hold_events (hold_id, kind, amount, api_key_id, idempotency_key, created_at)
    VALUES (p_hold, v_kind, v_amount, p_api_key, p_key, v_now);
    UPDATE users u SET held = u.held - v_amount, updated_at = v_now WHERE u.id = v_payer;
    RETURN QUERY SELECT 'ok', v_kind;
END $$;
