-- tandem_apply_deltas_v1: a batch of balance changes of one user, in the order given (the
-- order they arrived in: wallet/batching.py), in one statement: one row lock and one commit
-- for the lot. Each item is applied or refused on the balance the items before it left, as
-- tandem_apply_delta_v2 would have decided it alone: the result within held..2^63-1 (held:
-- the user's active holds, after its expired ones were released, once, here), a deposit
-- under the daily mint ceiling together with the deposits before it. Each applied item is
-- its own journal entry with its own balance after it (ids rising in the items' order, one
-- instant for the batch); a refused one changes nothing. Returns one row per item, in order
-- (balance after it or, refused, the balance it met; applied; its entry; refusal
-- 'mint_ceiling' when the ceiling refused it); no row at all: no such user.
--
-- The race it closes: the first statement takes the user's row lock (FOR UPDATE), so every
-- other change of the user (a batch, a transfer, a hold, the expiry task) waits, and the
-- batch's arithmetic reads a balance and a held amount no one else can change until the
-- commit. The CHECKs on users see only the final state, so the per-item arithmetic (never
-- below held, never past 2^63-1) is this function's own, in numeric (no overflow midway).
-- p_keys are unique in the journal per caller (p_api_keys[i]): the caller deduplicates a
-- batch before sending it, or the journal's unique index would refuse the whole batch. The
-- day's minted total is read once, under the lock, and the batch's deposits added to it: as
-- with tandem_mint_allowed_v1, backends committing at once may pass the ceiling together by
-- what each has in flight (here a batch's deposits, there one deposit).
CREATE FUNCTION tandem_apply_deltas_v1(
    p_user bigint, p_amounts bigint[], p_references text[], p_keys text[], p_api_keys bigint[])
RETURNS TABLE (balance bigint, applied boolean, entry_id bigint, refusal text)
LANGUAGE plpgsql AS $$
DECLARE
    v_now timestamptz;
    v_balance numeric;
    v_held bigint;
    v_ceiling bigint;
    v_minted numeric := 0;
    v_minting numeric := 0;
    v_amount bigint;
    v_balances bigint[] := '{}';
    v_applied boolean[] := '{}';
    v_refusals text[] := '{}';
    v_entries bigint[];
BEGIN
    SELECT u.balance, u.held INTO v_balance, v_held FROM users u WHERE u.id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- The batch's instant, read under the lock: every earlier entry of the user was written
    -- under it too, so the batch's entries are dated after them.
    v_now := clock_timestamp();
    IF v_held > 0 AND EXISTS (SELECT FROM unnest(p_amounts) a WHERE a < 0) THEN
        IF (SELECT x.released_holds FROM tandem_release_expired_v1(p_user) x) > 0 THEN
            SELECT u.held INTO v_held FROM users u WHERE u.id = p_user;
        END IF;
    END IF;
    IF EXISTS (SELECT FROM unnest(p_amounts) a WHERE a > 0) THEN
        -- tandem_mint_allowed_v1's reading, once: the deposits of this batch add to it.
        SELECT s.daily_mint_ceiling INTO v_ceiling FROM wallet_settings s;
        IF v_ceiling IS NOT NULL THEN
            SELECT coalesce(sum(m.minted), 0) INTO v_minted FROM mint_usage m
            WHERE m.day = (v_now AT TIME ZONE 'UTC')::date;
        END IF;
    END IF;
    -- Every array gets element i on each pass (so all three stay 1-based and equally long).
    FOR i IN 1 .. coalesce(cardinality(p_amounts), 0) LOOP
        v_amount := p_amounts[i];
        IF v_amount > 0 AND v_ceiling IS NOT NULL AND v_minted + v_minting + v_amount > v_ceiling
        THEN
            v_applied[i] := false;
            v_refusals[i] := 'mint_ceiling';
        ELSIF v_balance + v_amount BETWEEN v_held AND 9223372036854775807 THEN
            v_balance := v_balance + v_amount;
            v_minting := v_minting + greatest(v_amount, 0);
            v_applied[i] := true;
            v_refusals[i] := NULL;
        ELSE
            v_applied[i] := false;
            v_refusals[i] := NULL;
        END IF;
        v_balances[i] := v_balance;
    END LOOP;
    IF true = ANY (v_applied) THEN
        UPDATE users u SET balance = v_balance, updated_at = v_now WHERE u.id = p_user;
        -- The entries in the items' order: the identity is drawn row by row as the sorted rows
        -- reach the insert, so the ids rise with the items (and the journal's order, by id
        -- within one instant, is the order they were applied in).
        WITH inserted AS (
            INSERT INTO ledger_entries AS e
                (user_id, amount, balance, kind, reference, idempotency_key, api_key_id,
                 created_at)
            SELECT p_user, t.amount, t.balance,
                   CASE WHEN t.amount > 0 THEN 'deposit' ELSE 'withdrawal' END,
                   t.reference, t.key, t.api_key, v_now
            FROM unnest(p_amounts, v_balances, p_references, p_keys, p_api_keys, v_applied)
                 WITH ORDINALITY AS t(amount, balance, reference, key, api_key, applied, ord)
            WHERE t.applied
            ORDER BY t.ord
            RETURNING e.id
        )
        SELECT array_agg(i.id ORDER BY i.id) INTO v_entries FROM inserted i;
        IF v_minting > 0 THEN
            INSERT INTO mint_usage AS m (day, backend, minted)
            VALUES ((v_now AT TIME ZONE 'UTC')::date, pg_backend_pid(), v_minting)
            ON CONFLICT (day, backend) DO UPDATE SET minted = m.minted + EXCLUDED.minted;
        END IF;
    END IF;
    RETURN QUERY
        SELECT t.balance, t.applied,
               CASE WHEN t.applied
                    THEN v_entries[count(*) FILTER (WHERE t.applied) OVER (ORDER BY t.ord)]
               END,
               t.refusal
        FROM unnest(v_balances, v_applied, v_refusals)
             WITH ORDINALITY AS t(balance, applied, refusal, ord)
        ORDER BY t.ord;
END $$;
