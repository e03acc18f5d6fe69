-- tandem_events_from_entries_v1: the change stream's events of the journal, written by the
-- statement that writes the entries (an AFTER INSERT ... FOR EACH STATEMENT trigger on
-- ledger_entries, its new rows as the transition table new_entries), so an event commits
-- with its change or not at all, whichever function (of this release or an older one still
-- running in a rolling deploy) wrote the entries. One event per change, in the order of the
-- entries' ids:
--   'user.created'    an opening entry;
--   'balance.updated' a deposit or a withdrawal (not a capture's);
--   'transfer.created' a transfer, once, with both legs, from the statement that wrote its
--                     last leg (transfer_v3 and the batches write both in one statement);
--   'hold.captured'   a capture, with its entries as legs, from the statement that wrote its
--                     last entry (the capture writes the payer's leg, then the payee's), with
--                     the payer's held amount after it (the sum of its holds still active,
--                     which is users.held by the holds' invariant).
-- Run as the owner (SECURITY DEFINER): the application's role may not write events.
--
-- The race it closes: a consumer must see each user's events in the order that user's
-- balance changed. Every writer of entries holds the row lock of each user its entries
-- touch until its commit (every path locks users first), and this trigger runs inside that
-- statement, so an event's id is drawn under those locks: the next change of the same user
-- waits for this commit before it can draw a higher id. Event ids are therefore in each
-- user's order (not in commit order across users: tandem_stamp_events_v1 gives that).
CREATE FUNCTION tandem_events_from_entries_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- The common statement (a deposit or a withdrawal, alone or a batch of them) takes the
    -- short way: one insert, none of the transfers' and captures' grouping.
    IF NOT EXISTS (SELECT FROM new_entries n WHERE n.transfer_id IS NOT NULL
                   OR n.hold_id IS NOT NULL OR n.kind = 'opening') THEN
        INSERT INTO events (type, user_id, data, created_at)
        SELECT 'balance.updated', e.user_id,
               jsonb_build_object('userId', e.user_id, 'entryId', e.id, 'amount', e.amount,
                                  'balance', e.balance, 'kind', e.kind,
                                  'reference', e.reference),
               e.created_at
        FROM new_entries e
        ORDER BY e.id;
        RETURN NULL;
    END IF;
    INSERT INTO events (type, user_id, other_user_id, data, created_at)
    SELECT x.type, x.user_id, x.other_user_id, x.data, x.created_at
    FROM (
        SELECT e.id AS ord,
               CASE WHEN e.kind = 'opening' THEN 'user.created' ELSE 'balance.updated' END
                   AS type,
               e.user_id, NULL::bigint AS other_user_id,
               CASE WHEN e.kind = 'opening'
                    THEN jsonb_build_object('userId', e.user_id, 'entryId', e.id,
                                            'balance', e.balance)
                    ELSE jsonb_build_object('userId', e.user_id, 'entryId', e.id,
                                            'amount', e.amount, 'balance', e.balance,
                                            'kind', e.kind, 'reference', e.reference)
               END AS data,
               e.created_at
        FROM new_entries e
        WHERE e.transfer_id IS NULL AND e.hold_id IS NULL
        UNION ALL
        SELECT max(l.id), 'transfer.created', t.from_user_id, t.to_user_id,
               jsonb_build_object(
                   'transferId', t.id, 'amount', t.amount, 'reference', t.reference,
                   'legs', jsonb_agg(jsonb_build_object('userId', l.user_id, 'entryId', l.id,
                                                        'amount', l.amount,
                                                        'balance', l.balance) ORDER BY l.id)),
               t.created_at
        FROM (SELECT DISTINCT n.transfer_id FROM new_entries n
              WHERE n.transfer_id IS NOT NULL AND n.hold_id IS NULL) nt
        JOIN transfers t ON t.id = nt.transfer_id
        JOIN ledger_entries l ON l.transfer_id = t.id
        GROUP BY t.id
        HAVING count(*) = 2 AND max(l.id) IN (SELECT n.id FROM new_entries n)
        UNION ALL
        SELECT max(l.id), 'hold.captured', h.user_id, h.to_user_id,
               jsonb_build_object(
                   'holdId', h.id, 'userId', h.user_id, 'toUserId', h.to_user_id,
                   'amount', h.captured_amount, 'released', h.amount - h.captured_amount,
                   'held', (SELECT coalesce(sum(a.amount), 0) FROM holds a
                            WHERE a.user_id = h.user_id AND a.status = 'active'),
                   'transferId', max(l.transfer_id), 'reference', h.reference,
                   'legs', jsonb_agg(jsonb_build_object('userId', l.user_id, 'entryId', l.id,
                                                        'amount', l.amount,
                                                        'balance', l.balance) ORDER BY l.id)),
               max(l.created_at)
        FROM (SELECT DISTINCT n.hold_id FROM new_entries n WHERE n.hold_id IS NOT NULL) nh
        JOIN holds h ON h.id = nh.hold_id
        JOIN ledger_entries l ON l.hold_id = h.id
        GROUP BY h.id
        HAVING count(*) = CASE WHEN h.to_user_id IS NULL THEN 1 ELSE 2 END
           AND max(l.id) IN (SELECT n.id FROM new_entries n)
    ) x
    ORDER BY x.ord;
    RETURN NULL;
END $$;
