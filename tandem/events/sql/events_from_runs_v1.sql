-- tandem_events_from_runs_v1: the change stream's events of the cron's failures, written by
-- the statement that ends the run (an AFTER UPDATE ... FOR EACH ROW trigger on task_history,
-- when a running run becomes failed, lost or timed_out): 'task.run.failed', 'task.run.lost'
-- or 'task.run.timed_out', then 'task.run.exhausted' when the task retries (max_attempts > 1)
-- and no retry of this slot was planned (its last attempt). Run as the owner (SECURITY
-- DEFINER): the application's role, which ends runs, may not write events itself.
--
-- The race it closes: an event without its run's end, or an end without its event, after a
-- crash between two writes: the event is written by the same statement (COMPLETE_RUN,
-- SWEEP_EXPIRED), which also planned the retry in the task's row (a CTE of the statement,
-- visible here), so 'exhausted' is decided on what was committed with it.
CREATE FUNCTION tandem_events_from_runs_v1() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_task tasks%ROWTYPE;
    v_data jsonb;
BEGIN
    SELECT * INTO v_task FROM tasks t WHERE t.id = NEW.task_id;
    v_data := jsonb_build_object(
        'task', v_task.name, 'runId', NEW.id, 'instanceId', NEW.instance_id,
        'scheduledFor', NEW.scheduled_for, 'attempt', NEW.attempt,
        'maxAttempts', v_task.max_attempts, 'startedAt', NEW.started_at,
        'finishedAt', NEW.finished_at, 'error', NEW.error);
    INSERT INTO events (type, data) VALUES ('task.run.' || NEW.status, v_data);
    IF v_task.max_attempts > 1 AND NEW.status <> 'lost'
       AND NOT coalesce(v_task.retry_slot = NEW.scheduled_for
                        AND v_task.retry_attempt = NEW.attempt + 1, false) THEN
        INSERT INTO events (type, data) VALUES ('task.run.exhausted', v_data);
    END IF;
    RETURN NULL;
END $$;
