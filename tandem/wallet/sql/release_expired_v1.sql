-- tandem_release_expired_v1: releases a user's expired holds (active, their expires_at
-- reached by the database clock): each marked 'expired' with its event, and their amounts
-- taken off users.held. Called only inside the money functions (as their owner), when a
-- spending finds the available amount short; no EXECUTE for PUBLIC or the application.
--
-- The race it closes: a hold changes state only under its payer's row lock (every path
-- locks users before holds), so the user's row is locked first, and only when it holds
-- something (held > 0: a user without holds pays one index probe and takes no lock); the
-- holds are then read after the lock was granted, so a capture or release committed
-- meanwhile is seen and never released twice. Returns how many holds and how much.
CREATE FUNCTION tandem_release_expired_v1(
    p_user bigint, OUT released_holds integer, OUT released_amount bigint)
LANGUAGE plpgsql AS $$
BEGIN
    released_holds := 0;
    released_amount := 0;
    PERFORM 1 FROM users u WHERE u.id = p_user AND u.held > 0 FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    WITH due AS (
        UPDATE holds h SET status = 'expired', finished_at = clock_timestamp()
        WHERE h.user_id = p_user AND h.status = 'active' AND h.expires_at <= clock_timestamp()
        RETURNING h.id, h.amount
    ), events AS (
        INSERT INTO hold_events (hold_id, kind, amount) SELECT d.id, 'expired', d.amount FROM due d
    )
    SELECT count(*), coalesce(sum(d.amount), 0) INTO released_holds, released_amount FROM due d;
    IF released_amount > 0 THEN
        UPDATE users u SET held = u.held - released_amount, updated_at = clock_timestamp()
        WHERE u.id = p_user;
    END IF;
END $$;
