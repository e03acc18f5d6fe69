-- tandem_record_task_action_v2: the audit row of a schedule command sent through the API
-- (create, change, delete, run, pause, resume), signed by the API key p_api_key, with a note
-- (a pause's reason, what a change dropped); run as the owner, because the application's role
-- may not write task_actions itself (it could then write any history). v1 stays for the
-- previous release.
--
-- The race it closes: none; the invariant it keeps is that audit rows are only appended, each
-- dated by the database (the table's triggers refuse UPDATE, DELETE and TRUNCATE).
CREATE FUNCTION tandem_record_task_action_v2(
    p_task bigint, p_action text, p_api_key bigint, p_note text)
RETURNS void LANGUAGE sql AS $$
INSERT INTO task_actions (task_id, action, api_key_id, note)
VALUES (p_task, p_action, p_api_key, p_note)
$$;
