-- tandem_prune_events_v1: deletes the oldest stamped events, in position order, up to
-- p_limit of them, as long as every one deleted was created more than p_keep ago; records
-- the last position deleted (event_stream.pruned_through: a cursor below it is expired).
-- Returns how many it deleted. Run as the owner (the housekeeping task runs on the
-- application's role, which may not delete events).
--
-- The race it closes: a reader told its cursor is still good while the events after it are
-- being deleted: the stream's row is locked (FOR UPDATE: waits for a stamper, which holds it
-- briefly) and pruned_through raised in the same transaction as the delete, so a reader sees
-- both or neither. Only a prefix of the positions is deleted, never a hole.
CREATE FUNCTION tandem_prune_events_v1(p_keep interval, p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_from bigint;
    v_through bigint;
    v_count integer;
BEGIN
    SELECT s.pruned_through INTO v_from FROM event_stream s FOR UPDATE;
    SELECT max(o.position) INTO v_through FROM (
        SELECT f.position, bool_and(f.created_at < clock_timestamp() - p_keep)
                   OVER (ORDER BY f.position) AS old
        FROM (SELECT e.position, e.created_at FROM events e
              WHERE e.position > v_from ORDER BY e.position LIMIT p_limit) f
    ) o WHERE o.old;
    IF v_through IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM events e WHERE e.position > v_from AND e.position <= v_through;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    UPDATE event_stream s SET pruned_through = v_through;
    RETURN v_count;
END $$;
