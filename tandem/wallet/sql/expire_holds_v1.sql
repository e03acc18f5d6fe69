-- tandem_expire_holds_v1: the expiry task's batch: releases the due holds (active, their
-- expires_at reached by the database clock) of up to p_limit of them, user by user; returns
-- how many holds it expired. Run as the owner (the task runs on the application's role).
--
-- The race it closes: instances running the task at once, and the payers' own requests.
-- Each payer's row is locked FOR UPDATE SKIP LOCKED before its holds (users before holds, as
-- every path): a payer another transaction holds (a request of its own, or another
-- instance's batch) is skipped, not waited on, and its expired holds are released by its own
-- next spending (tandem_release_expired_v1) or the next round. The holds are read again
-- after the lock, so none is released twice.
CREATE FUNCTION tandem_expire_holds_v1(p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_user bigint;
    v_expired integer := 0;
BEGIN
    FOR v_user IN
        SELECT DISTINCT d.user_id FROM (
            SELECT h.user_id FROM holds h
            WHERE h.status = 'active' AND h.expires_at <= clock_timestamp()
            ORDER BY h.expires_at LIMIT p_limit
        ) d
    LOOP
        PERFORM 1 FROM users u WHERE u.id = v_user FOR UPDATE SKIP LOCKED;
        IF FOUND THEN
            v_expired := v_expired
                + (SELECT x.released_holds FROM tandem_release_expired_v1(v_user) x);
        END IF;
    END LOOP;
    RETURN v_expired;
END $$;
