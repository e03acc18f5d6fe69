-- tandem_record_task_action_v1: the audit row of a task command (run, pause, resume) sent
-- through the API, signed by the API key p_api_key; run as the owner, because the
-- application's role may not write task_actions itself (it could then write any history).
--
-- The race it closes: none; the invariant it keeps is that audit rows are only appended, each
-- dated by the database (the table's triggers refuse UPDATE, DELETE and TRUNCATE).
CREATE FUNCTION tandem_record_task_action_v1(p_task bigint, p_action text, p_api_key bigint)
RETURNS void LANGUAGE sql AS $$
INSERT INTO task_actions (task_id, action, api_key_id) VALUES (p_task, p_action, p_api_key)
$$;
