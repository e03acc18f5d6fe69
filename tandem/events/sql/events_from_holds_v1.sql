-- tandem_events_from_holds_v1: the change stream's events of holds, written by the statement
-- that writes the hold's event row (an AFTER INSERT ... FOR EACH STATEMENT trigger on
-- hold_events, its new rows as the transition table new_hold_events): 'hold.created',
-- 'hold.released' and 'hold.expired', each with the payer's held amount after it. A
-- capture's event is written with its entries (tandem_events_from_entries_v1): its
-- 'captured' row, and the 'released' row of the rest of a partial capture, write none here.
-- Run as the owner (SECURITY DEFINER).
--
-- The race it closes: as for the journal's events, each writer holds the payer's row lock
-- (users before holds on every path), so the event's id is drawn under it and ids are in the
-- payer's order. The held amount after each event is computed, not read from users.held:
-- the functions update users.held before or after writing the hold's event row, but always
-- change the hold's status first, so the sum of the payer's active holds is the held amount
-- after the statement; an event followed, in the same statement, by others of the same
-- payer (the expiry releasing several) adds back what those released.
CREATE FUNCTION tandem_events_from_holds_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO events (type, user_id, other_user_id, data, created_at)
    SELECT 'hold.' || x.kind, x.user_id, x.to_user_id,
           jsonb_build_object(
               'holdId', x.hold_id, 'userId', x.user_id, 'toUserId', x.to_user_id,
               'amount', x.amount,
               'held', x.active + coalesce(x.later, 0),
               'expiresAt', x.expires_at, 'reference', x.reference),
           x.created_at
    FROM (
        SELECT e.id, e.kind, e.hold_id, e.amount, e.created_at, h.user_id, h.to_user_id,
               h.expires_at, h.reference,
               (SELECT coalesce(sum(a.amount), 0) FROM holds a
                WHERE a.user_id = h.user_id AND a.status = 'active') AS active,
               sum(CASE WHEN e.kind = 'created' THEN -e.amount ELSE e.amount END) OVER (
                   PARTITION BY h.user_id ORDER BY e.id DESC
                   ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS later
        FROM new_hold_events e
        JOIN holds h ON h.id = e.hold_id
        WHERE e.kind <> 'captured' AND NOT (e.kind = 'released' AND h.status = 'captured')
    ) x
    ORDER BY x.id;
    RETURN NULL;
END $$;
