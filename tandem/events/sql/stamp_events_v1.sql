-- tandem_stamp_events_v1: the sequencer: gives up to p_limit committed events that have no
-- position yet the next positions of the stream, in the order of their ids, and returns how
-- many it stamped and the stream's last position (NULL, 0 when another stamping transaction
-- holds the stream: it skips, never waits). Notifies channel 'tandem_events' with the last
-- position when it stamped something (delivered at the commit). Run as the owner: the
-- application's role reads events and never writes them.
--
-- The race it closes: a cursor that skips. Event ids are drawn before their transactions
-- commit, so they commit out of id order (8 before 7): a reader paging by id past 8 would
-- never see 7. Positions are drawn here instead, by one stamping transaction at a time (the
-- stream's one row, locked FOR UPDATE SKIP LOCKED, is the fence: it works through a
-- transaction pooler, and a stamper that dies releases it with its transaction), only for
-- events already committed (visible to this statement), and committed before the next
-- stamping transaction may lock the row: positions become visible in position order, so
-- a reader past position p never misses a position below p. Each user's order is kept: an
-- event of a user is written under the user's row lock (tandem_events_from_entries_v1), so a
-- user's earlier event committed before its later one was even written, and a snapshot that
-- sees the later one sees the earlier one: stamped in the same round or before, and within
-- a round in id order, which is the user's order.
CREATE FUNCTION tandem_stamp_events_v1(p_limit integer)
RETURNS TABLE (stamped integer, last_position bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_last bigint;
    v_count integer;
BEGIN
    SELECT s.last_position INTO v_last FROM event_stream s FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 0, NULL::bigint;
        RETURN;
    END IF;
    WITH batch AS (
        SELECT u.id, row_number() OVER (ORDER BY u.id) AS n
        FROM (SELECT e.id FROM events e WHERE e.position IS NULL ORDER BY e.id LIMIT p_limit) u
    )
    UPDATE events e SET position = v_last + b.n FROM batch b WHERE e.id = b.id;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        v_last := v_last + v_count;
        UPDATE event_stream s SET last_position = v_last;
        PERFORM pg_notify('tandem_events', v_last::text);
    END IF;
    RETURN QUERY SELECT v_count, v_last;
END $$;
