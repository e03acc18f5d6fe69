-- tandem_hold_transition_v1: the trigger function that lets a hold row change only as a hold
-- does: from 'active' to 'captured', 'released' or 'expired', once, with what it was made
-- with unchanged (a capture may name the payee of a hold that had none).
--
-- The race it closes: none; the invariant it keeps is that a hold's state is a journal of
-- its own (each change is also a hold_events row): no role, the owner included, can revive
-- a finished hold, capture one twice or rewrite its amount. A row-level BEFORE UPDATE
-- trigger; DELETE and TRUNCATE are refused by tandem_append_only_v1.
CREATE FUNCTION tandem_hold_transition_v1() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status <> 'active'
       OR NEW.status NOT IN ('captured', 'released', 'expired')
       OR (NEW.id, NEW.user_id, NEW.amount, NEW.expires_at, NEW.created_at, NEW.reference,
           NEW.idempotency_key, NEW.api_key_id, NEW.available_after)
          IS DISTINCT FROM
          (OLD.id, OLD.user_id, OLD.amount, OLD.expires_at, OLD.created_at, OLD.reference,
           OLD.idempotency_key, OLD.api_key_id, OLD.available_after)
       OR (NEW.to_user_id IS DISTINCT FROM OLD.to_user_id
           AND (OLD.to_user_id IS NOT NULL OR NEW.status <> 'captured')) THEN
        RAISE EXCEPTION 'holds change only from active to captured, released or expired: % '
                        'of hold % refused', TG_OP, OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
