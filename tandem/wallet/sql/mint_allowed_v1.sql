-- tandem_mint_allowed_v1: whether p_amount more may be created today (UTC) under the owner's
-- daily ceiling (wallet_settings.daily_mint_ceiling; NULL: no ceiling). Called only inside
-- the money functions, which run as the owner; the application's role may not execute it.
--
-- The race it closes: none exactly. Each backend counts its own mints in a row of its own
-- (mint_usage: no single hot row), and this reads every backend's committed rows: mints in
-- flight on other backends are not seen, so a day may pass the ceiling by at most one mint
-- per backend in flight.
CREATE FUNCTION tandem_mint_allowed_v1(p_amount bigint) RETURNS boolean
LANGUAGE sql AS $$
SELECT p_amount <= 0 OR coalesce((
    SELECT coalesce((SELECT sum(m.minted) FROM mint_usage m
                     WHERE m.day = (clock_timestamp() AT TIME ZONE 'UTC')::date), 0)
           + p_amount <= s.daily_mint_ceiling
    FROM wallet_settings s WHERE s.daily_mint_ceiling IS NOT NULL), true)
$$;
