-- tandem_append_only_v1: the trigger function that keeps the journal (ledger_entries,
-- transfers) append-only.
--
-- The race it closes: none; the invariant it keeps is that history is never rewritten, by
-- any role, the owner included (privileges alone do not bind the owner). Its triggers are
-- statement-level, BEFORE UPDATE OR DELETE OR TRUNCATE, so a statement is refused even when
-- no row matches.
CREATE FUNCTION tandem_append_only_v1() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
